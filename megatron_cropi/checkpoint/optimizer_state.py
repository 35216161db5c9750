"""megatron-core 0.16's optimizer state around a distributed checkpoint, with torch's own Adam.

Without Transformer Engine or Apex (every CPU run) a distributed-optimizer checkpoint does not load into
a fresh optimizer as shipped: ``state_dict()`` needs an allocated state, the loader copies a ``step`` key
the checkpoint does not carry, and the restored ``step`` tensor is shared by every parameter (Adam
increments it once per parameter per step). :func:`prepare_optimizer_for_load` and
:func:`finish_optimizer_load` work around the three; :mod:`.dist_ckpt` calls them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["prepare_optimizer_for_load", "finish_optimizer_load", "reload_main_params", "optimizer_has_state"]


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def prepare_optimizer_for_load(optimizer) -> None:
    """Allocate torch-Adam state and make the loader tolerate the checkpoint's missing ``step`` key."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in _optimizers(optimizer):
        if not isinstance(opt, DistributedOptimizer):
            continue
        inner = opt.optimizer
        if isinstance(inner, torch.optim.Optimizer) and len(inner.state) == 0:
            # a zero-gradient step allocates exp_avg/exp_avg_sq/step; the weights are loaded afterwards
            opt._init_optimizer_states_with_dummy_values()
        if getattr(opt, "_cropi_step_tolerant", False):
            continue
        original = opt._set_main_param_and_optimizer_states

        def tolerant(model_param, tensors, _opt=opt, _orig=original):
            current = _opt._get_main_param_and_optimizer_states(model_param)
            if "step" in current and "step" not in tensors:  # the step comes from the param groups
                tensors = {**tensors, "step": current["step"]}
            return _orig(model_param, tensors)

        opt._set_main_param_and_optimizer_states = tolerant
        opt._cropi_step_tolerant = True


def finish_optimizer_load(optimizer) -> None:
    """Give every parameter its own ``step`` tensor (torch Adam increments it in place)."""
    for opt in _optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].detach().clone()


def reload_main_params(optimizer) -> None:
    """Copy the model's weights into the optimizer's fp32 main weights, after any write to the parameters
    outside the optimizer (weights-only or HF load): megatron-core's mixed-precision optimizers step the
    main copy and copy it back. A no-op for fp32 models (the main weights are the parameters or views)."""
    optimizer.reload_model_params()


def optimizer_has_state(optimizer, device) -> bool:
    """Whether every rank's optimizer has taken a step (before the first one there is nothing to save)."""
    mine = all(len(getattr(o, "optimizer", o).state) > 0 for o in _optimizers(optimizer)
               if isinstance(getattr(o, "optimizer", None), torch.optim.Optimizer))
    flag = torch.tensor([int(mine)], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
