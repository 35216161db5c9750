"""GRPO on Megatron-Core: the loss, the trainer step, the optimizer, the reference model, weight sync.

    from megatron_cropi.grpo import GrpoConfig, GrpoTrainer
"""

from megatron_cropi.grpo.config import CheckpointConfig, GrpoConfig, GrpoLossConfig, OptimConfig
from megatron_cropi.grpo.loss import LossNormalizer, aggregate, grpo_loss, kl_penalty, policy_gradient_terms
from megatron_cropi.grpo.rollouts import RolloutCollector, make_rewarder, per_response_rewarder
from megatron_cropi.grpo.trainer import GrpoTrainer

__all__ = [
    "CheckpointConfig", "GrpoConfig", "GrpoLossConfig", "OptimConfig", "LossNormalizer", "aggregate", "grpo_loss",
    "kl_penalty", "policy_gradient_terms", "RolloutCollector", "make_rewarder", "per_response_rewarder", "GrpoTrainer",
]
