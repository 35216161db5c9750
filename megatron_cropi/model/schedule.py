"""One call into Megatron's pipeline schedules with this run's groups passed explicitly.

Every forward/backward of the package (POPI capture, GRPO steps, log-prob passes) goes through
:func:`forward_backward`, so PP scheduling is always Megatron's own ``get_forward_backward_func``.
Given a list of V > 1 model chunks (the interleaved, virtual pipeline schedule:
:func:`~megatron_cropi.model.provider.build_model_chunks`) it runs Megatron's
``forward_backward_pipelining_with_interleaving``, which takes one data iterator per chunk.

Loss contract (megatron-core 0.16+): ``forward_step_func(data_iterator, model)`` returns
``(output_tensor, loss_func)``; on the last stage ``loss_func(output_tensor)`` returns
``(loss, reduced_dict)`` and Megatron divides ``loss`` by ``num_microbatches`` before backward. Our
losses are already normalised over the whole step, so :func:`scale_for_schedule` undoes that division.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

from megatron_cropi.parallel import ParallelGroups

__all__ = ["forward_backward", "scale_for_schedule", "causal_attention_mask", "broadcast_from_last_stage", "as_chunks"]


def as_chunks(model) -> list:
    """``model`` as a list of model chunks: the list itself, or ``[model]`` for one module."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def scale_for_schedule(loss: torch.Tensor, num_microbatches: int) -> torch.Tensor:
    """``loss × num_microbatches``: after Megatron's division by M the gradient is that of ``loss``."""
    return loss * num_microbatches


def causal_attention_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, S, S]`` bool mask, True = masked (Megatron's convention); future positions masked."""
    return torch.triu(torch.ones(1, 1, seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)


def forward_backward(
    model,
    groups: ParallelGroups,
    *,
    forward_step_func: Callable,
    data_iterator: Iterator[Any],
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list[dict]:
    """Run Megatron's schedule for this pipeline layout over ``num_microbatches`` micro-batches.

    Args:
        model: this rank's model stage (a module, or a one-element list of it), or its V > 1 chunks
            under the interleaved schedule (needs PP > 1 and ``config.virtual_pipeline_model_parallel_size
            == V``).
        groups: process groups; passed to Megatron as ``pg_collection`` (and a p2p communicator
            for PP > 1).
        forward_step_func: see the module docstring.
        data_iterator: yields one micro-batch per call, on every stage (stages other than the first
            use only what their loss or masks need); with V chunks a list of V iterators, chunk ``v``'s
            called once per micro-batch, in micro-batch order.
        seq_length, micro_batch_size: activation shape ``[seq_length, micro_batch_size, hidden]``
            sent between stages; every micro-batch must be padded to it.
        forward_only: no backward (log-prob passes).

    Returns:
        The per-micro-batch ``reduced_dict`` values on the last stage, ``[]`` elsewhere.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    models = as_chunks(model)
    vp = len(models) if len(models) > 1 else None
    configured = getattr(getattr(models[0], "config", None), "virtual_pipeline_model_parallel_size", None)
    if vp is not None or configured is not None:
        if groups.pp_size < 2 or configured != vp or not isinstance(data_iterator, list) or len(data_iterator) != vp:
            raise ValueError(f"{len(models)} model chunk(s) with virtual_pipeline_model_parallel_size={configured}: "
                             f"the interleaved schedule needs all V chunks of a rank, PP > 1 (got {groups.pp_size}) "
                             "and one data iterator per chunk")
    # explicit sizes: megatron must not fall back to its global model-parallel state for them
    fb = get_forward_backward_func(pp_size=groups.pp_size, vp_size=vp)
    kwargs = dict(pg_collection=groups.pg_collection)
    if groups.pp_size > 1:
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=groups.pp, config=models[0].config)
    return fb(
        forward_step_func=forward_step_func,
        data_iterator=data_iterator,
        model=models,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        **kwargs,
    )


def broadcast_from_last_stage(value: torch.Tensor | None, groups: ParallelGroups, *, shape, dtype) -> torch.Tensor:
    """Share a tensor computed on the last pipeline stage with every stage of this PP group."""
    import torch.distributed as dist

    if groups.pp_size == 1:
        return value
    value = torch.empty(shape, dtype=dtype, device=groups.device) if value is None else value.contiguous()
    src = dist.get_global_rank(groups.pp, groups.pp_size - 1)
    dist.broadcast(value, src=src, group=groups.pp)
    return value
