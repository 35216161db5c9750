"""fp16 trains (issue 14): ``model.params_dtype: float16`` uses megatron-core's dynamic loss scaler.

The learner multiplies its loss by the scaler's scale for the backward (``config.grad_scale_func``, as
Megatron's ``training.py`` sets it) and the optimizer divides the gradients by it, skips a step whose
gradient overflowed and lowers the scale. Before, the scale divided gradients that had never been
multiplied by it (2^32 by default): Adam's updates all but vanished under its ε and nothing was learnt.
On the easy task (reward 1 iff the first response token is a digit) the reward must rise as it does in
fp32 (tests/distributed/test_grpo_learning.py), with the scale logged, and an overflow must be skipped,
counted and followed by a lower scale.
"""

import numpy as np
import pytest

from megatron_cropi.testing.spawn import run_ranks

STEPS = 14
GRPO = {"steps": STEPS, "prompts_per_step": 16, "micro_batch_prompts": 8,
        "loss": {"kl_coef": 0.001, "entropy_coef": 0.0},
        "optim": {"lr": 3e-3, "weight_decay": 0.0, "initial_loss_scale": 1024.0, "hysteresis": 1}}


SGD = {**GRPO, "optim": {"optimizer": "sgd", "lr": 0.5, "weight_decay": 0.0, "clip_grad": 0.0,
                          "use_distributed_optimizer": False}}  # megatron-core shards Adam only


def _sgd_step_delta(g, dtype, rollouts):
    """The weight change of one SGD step (scale-sensitive, unlike Adam) on fixed rollouts, per name."""
    from megatron_cropi.testing.grpo_tiny import build_tiny_trainer

    t = build_tiny_trainer(g, SGD, model={"vocab_size": 32, "params_dtype": dtype})
    before = {n: p.detach().double().clone() for n, p in t.model.named_parameters()}
    m = t.train_on_rollouts(rollouts, list(range(len(rollouts))))
    assert m["updates"] == 1, m
    return {n: p.detach().double() - before[n] for n, p in t.model.named_parameters()}


def _learn():
    import torch

    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.testing.grpo_tiny import build_tiny_trainer, easy_prompts

    init_distributed()
    g = build_parallel_groups(1, 1)
    probe = build_tiny_trainer(g, SGD, model={"vocab_size": 32})
    rollouts = probe.collector.collect(easy_prompts(2)[:16], probe.sampling)
    d32, d16 = _sgd_step_delta(g, "float32", rollouts), _sgd_step_delta(g, "float16", rollouts)
    num = sum(float((d16[n] - d32[n]).norm() ** 2) for n in d32) ** 0.5
    den = sum(float(d32[n].norm() ** 2) for n in d32) ** 0.5
    sgd_rel_err = num / den

    trainer = build_tiny_trainer(g, GRPO, prompts=easy_prompts(8), model={"vocab_size": 32, "params_dtype": "float16"})
    assert next(trainer.model.parameters()).dtype == torch.float16
    history = [trainer.step() for _ in range(STEPS)]

    # an overflow: an inf in one gradient is what a too-large scale produces
    def overflow(model):
        next(p for p in model.parameters() if p.requires_grad).main_grad.view(-1)[0] = float("inf")

    trainer.learner.after_backward = overflow
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    m = trainer.step()
    unchanged = all(torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    return [h["reward"] for h in history], [h["loss_scale"] for h in history], m, unchanged, sgd_rel_err


@pytest.mark.timeout(300)
def test_fp16_reward_rises_with_the_loss_scaler():
    rewards, scales, overflowed, unchanged, sgd_rel_err = run_ranks(_learn, 1, timeout_s=280)[0]
    # the fp16 gradient is the fp32 one (not 1/scale of it): one SGD step moves the weights alike
    assert sgd_rel_err < 0.1, f"fp16 SGD step differs from fp32's by {sgd_rel_err:.3f} (relative)"
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert first < 0.6, f"the task is not learnt yet at the start: {rewards}"
    assert last >= 0.75 and last >= first + 0.3, f"fp16: mean reward did not rise enough: {np.round(rewards, 3)}"
    assert all(s >= 1.0 for s in scales) and scales[0] == 1024.0, scales
    assert overflowed["updates"] == 0 and overflowed["nonfinite_updates"] == 1 and overflowed["nonfinite_total"] == 1
    assert unchanged, "an overflowed fp16 step changed the weights"
    assert overflowed["loss_scale"] == scales[-1] / 2  # hysteresis 1: halved at the first overflow
