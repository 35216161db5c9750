"""megatron-core's training machinery around the policy: DDP, the (distributed) optimizer, LR schedule.

* :func:`wrap_ddp`: ``megatron.core.distributed.DistributedDataParallel`` with fp32 gradient buffers
  (``param_and_grad_buffer``), no overlap (gradients are reduced once, after the last micro-batch),
  and ``finalize_model_grads`` installed as the schedule's finaliser (DP reduce / reduce-scatter,
  tied-embedding gradients across the first and last pipeline stages).
* :func:`build_optimizer`: ``get_megatron_optimizer`` (Adam = AdamW with decoupled weight decay, no
  decay on biases and norms; ``DistributedOptimizer`` when ``use_distributed_optimizer``) with global
  gradient-norm clipping over every TP/PP/DP shard, and ``OptimizerParamScheduler`` for the LR.
  fp16 models get megatron-core's dynamic loss scaler (:func:`loss_scaler`; the learner multiplies
  its loss by the scale through ``config.grad_scale_func``, as Megatron's ``training.py`` does).

DDP's gradient scaling: with ``average_in_collective=False`` each rank's gradient is multiplied by
``1/dp`` before the sum over the DP group, so the reduced gradient is the *mean* of the ranks' losses'
gradients. The GRPO loss is normalised for the whole step already, so the trainer multiplies each
rank's loss by ``dp`` (:func:`dp_loss_scale`) and the result is the gradient of the global loss.
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_cropi.grpo.config import OptimConfig
from megatron_cropi.parallel import ParallelGroups

__all__ = ["wrap_ddp", "build_optimizer", "dp_loss_scale", "current_lr", "loss_scaler"]


def wrap_ddp(model, groups: ParallelGroups, cfg: OptimConfig):
    """This rank's model stage inside megatron-core DDP (parameters move into contiguous buffers)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        average_in_collective=False,
    )
    ddp = DistributedDataParallel(model.config, ddp_cfg, model, pg_collection=groups.pg_collection)
    # the schedule calls this after the last backward: DP reduction and tied-embedding all-reduce
    model.config.finalize_model_grads_func = partial(finalize_model_grads)
    return ddp


def dp_loss_scale(groups: ParallelGroups) -> float:
    """Factor that undoes DDP's ``1/dp`` pre-scaling (see the module docstring)."""
    return float(groups.dp_size)


def build_optimizer(ddp_model, groups: ParallelGroups, cfg: OptimConfig, *, total_steps: int):
    """The megatron-core optimizer and LR scheduler of ``ddp_model``.

    Args:
        ddp_model: from :func:`wrap_ddp`.
        cfg: optimizer settings.
        total_steps: optimizer steps of the run (``lr_decay_steps`` defaults to it).

    Returns:
        ``(optimizer, scheduler)``; ``optimizer.step()`` returns ``(ok, grad_norm, num_zeros)``.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    dtype = ddp_model.config.params_dtype
    ocfg = OptimizerConfig(
        optimizer=cfg.optimizer, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, use_distributed_optimizer=cfg.use_distributed_optimizer,
        params_dtype=dtype, bf16=dtype is torch.bfloat16, fp16=dtype is torch.float16,
        # fp16: megatron-core's dynamic loss scaler (the learner sets grad_scale_func for its backward)
        initial_loss_scale=cfg.initial_loss_scale, min_loss_scale=cfg.min_loss_scale,
        loss_scale_window=cfg.loss_scale_window, hysteresis=cfg.hysteresis,
    )
    optimizer = get_megatron_optimizer(ocfg, [ddp_model], pg_collection=groups.pg_collection,
                                       use_gloo_process_groups=False)
    _fix_param_group_index_map(optimizer)
    decay = cfg.lr_decay_steps or max(total_steps, cfg.lr_warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=cfg.lr_warmup_init, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_steps, lr_decay_steps=max(decay, cfg.lr_warmup_steps + 1),
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=1, wd_incr_style="constant", use_checkpoint_opt_param_scheduler=True,
    )
    return optimizer, scheduler


def _fix_param_group_index_map(optimizer) -> None:
    """Point each model parameter at its own main parameter in the distributed optimizer's groups.

    megatron-core 0.16 numbers a parameter by its position among the group's parameters in buffer
    order, but orders the inner optimizer's group as ``[fp32 params..., fp32 copies of bf16/fp16
    params...]``. When a group mixes the two (a bf16 model on the local spec keeps its norm weights in
    fp32) the numbers point at other parameters' main weights and moments, and saving or loading the
    optimizer state fails or swaps them; the optimizer step itself does not use the map.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or not hasattr(opt, "model_fp32_groups"):
            continue
        fixed = {}
        for gi, (fp32, half) in enumerate(zip(opt.model_fp32_groups, opt.model_float16_groups)):
            for order, param in enumerate([*fp32, *half]):  # the order of param_groups[gi]["params"]
                fixed[param] = (gi, order)
        if len(fixed) == len(opt.model_param_group_index_map):
            opt.model_param_group_index_map = fixed


def loss_scaler(optimizer):
    """The optimizer's loss scaler (fp16: a ``DynamicGradScaler``), or None (bf16/fp32 need none)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        scaler = getattr(opt, "grad_scaler", None)
        if scaler is not None:
            return scaler
    return None


def current_lr(optimizer) -> float:
    """The learning rate of the first parameter group (what the scheduler set)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.param_groups:
            return float(group["lr"])
    return 0.0
