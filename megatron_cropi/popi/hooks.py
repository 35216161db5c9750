"""Gradient taps that turn Megatron's backward into projected per-prompt gradients.

Two taps, installed by context managers that remove every hook (and restore ``requires_grad``) on
exit:

* :class:`PerPromptTap` (capture mode a): one prompt per micro-batch. A hook on each parameter's
  ``AccumulateGrad`` projects the freshly accumulated gradient shard and frees it at once, so no full
  gradient is ever held. The stage output's gradient hook tells which micro-batch's backward runs
  (1F1B interleaves forwards and backwards).
* :class:`BatchedTap` (capture mode b): many prompts per micro-batch, parameters frozen so Megatron
  skips its weight-gradient GEMMs (``linear_with_frozen_weight``). Forward hooks on
  Column/RowParallelLinear, norms and the vocab-parallel embedding keep the layer input; a hook on the
  layer output's gradient forms the per-prompt gradients of that layer a bounded block at a time
  (:mod:`megatron_cropi.popi.per_sample`, :mod:`megatron_cropi.popi.blocks`: prompts × rows of the
  weight, from chunks of positions), projects each block (a row block is a :class:`ShardSpec` of its
  own: the projection is defined on global indices, so blocks add up) and drops it before the next.
  Each closure carries the
  micro-batch id of the tensors it was registered on (see *Attribution*).

**Attribution.** A gradient hook must book to the micro-batch whose backward produced the gradient.
A stage's backward of micro-batch ``j`` starts at the gradient of ``j``'s stage output and runs to its
end before the next backward (Megatron's schedules run one ``backward_step`` at a time), so a hook on
each stage output sets ``backward_mb = j``. A layer's forward hook tags its closure with

* ``current_mb`` (the micro-batch of the forward step) when it runs in an ordinary forward, and
* ``backward_mb`` when it runs *inside a backward* (``torch._C._current_autograd_node()`` is set):
  that is activation recomputation (``recompute_granularity: full``), which re-runs the layer's
  forward during ``j``'s backward, when under PP the schedule's forwards have moved on to later
  micro-batches (first stage, PP = 2, 1F1B: fwd0 fwd1 bwd0 ...).

Either way the tag is fixed when the tensors are made, from the pass that makes them, and never read
from later global state (``tests/distributed/test_popi_capture_recompute.py``).

Under the interleaved (virtual pipeline) schedule a rank holds several model chunks and each gets its
own tap: a chunk's output mark, ``current_mb`` and ``backward_mb`` are that chunk's, and Megatron still
runs one chunk's backward at a time, so the same rule holds chunk by chunk however far the forwards of
other chunks have run ahead (``tests/distributed/test_popi_capture_interleaved.py``).

**Sequence parallelism** (``sequence_parallel``, TP > 1, local spec): activations between layers are
this rank's positions ``[s/t, N, h]``. A ColumnParallelLinear gathers its input inside its forward, so
its forward hook holds the shard and the backward hook all-gathers it (once per layer and backward,
as megatron's own weight-gradient path does); a RowParallelLinear reduce-scatters its output, so the
hook all-gathers the output gradient; the RoPE embedding reduce-scatters the looked-up rows, so its
gradient is gathered too. Norms need nothing: a norm's per-prompt gradient from its own positions is a
TP partial, flagged ``grad_partial_over_tp`` like the q/k norms' and summed with the sketch.
Micro-batch lengths are padded to a multiple of TP by :class:`~megatron_cropi.popi.capture.PopiCapture`
(``tests/distributed/test_popi_capture_sp.py``).

Both add into ``partial[row]`` (``[num_rows, k]`` float32), this rank's share of each prompt's sketch;
TP-replicated parameters are projected on TP rank 0 only, except q/k norms (and under SP every norm)
whose raw gradient is a partial sum over TP ranks (:attr:`ParamLayout.projects_raw_grad`).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from megatron_cropi.model.params import ParamLayout
from megatron_cropi.popi.blocks import BLOCK_BYTES
from megatron_cropi.popi.per_sample import embedding_grad_blocks, linear_grad_blocks, norm_grads_chunked
from megatron_cropi.projection.base import ShardSpec

__all__ = ["PerPromptTap", "BatchedTap", "UnsupportedParameterError", "gather_sequence"]


class UnsupportedParameterError(RuntimeError):
    """A parameter selected for scoring is not reachable by the batched tap."""


def gather_sequence(t: torch.Tensor, group) -> torch.Tensor:
    """All-gather sequence shards ``[s/t, ...]`` of the TP ``group`` into ``[s, ...]`` (rank order, as
    megatron splits them). A collective: every rank of ``group`` must call it in the same order (the
    TP ranks run the same hooks in the same backward order)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    if world == 1:
        return t
    out = t.new_empty((t.shape[0] * world,) + tuple(t.shape[1:]))
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out


def _row_block(spec: ShardSpec, first: int, rows: int) -> ShardSpec:
    """Rows ``first : first + rows`` of the block ``spec`` (counted from its own first row)."""
    if first == 0 and rows == spec.shape[0]:
        return spec
    return ShardSpec(spec.global_name, spec.global_shape, (spec.offset[0] + first,) + tuple(spec.offset[1:]),
                     (rows,) + tuple(spec.shape[1:]))


def _project_into(partial: torch.Tensor, rows: torch.Tensor, projector, layout: ParamLayout, grads: torch.Tensor):
    """Project per-row gradients ``[R, *local_shape]`` of one parameter into ``partial[rows]``."""
    for local_slices, spec in layout.pieces:
        sketch = projector.project(grads[(slice(None),) + local_slices], spec)
        partial.index_add_(0, rows, sketch.to(partial.device))


class _Tap(contextlib.AbstractContextManager):
    """What both taps share: hook handles, and ``requires_grad`` flags changed on entry, restored on exit."""

    def __init__(self, model):
        self.model = model
        self._handles: list = []
        self._saved_requires_grad: dict[str, bool] = {}

    def _set_trainable(self, trainable) -> None:
        for name, p in self.model.named_parameters():
            self._saved_requires_grad[name] = p.requires_grad
            p.requires_grad_(trainable(name))
            p.grad = None

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._saved_requires_grad.get(name, True))
            p.grad = None
        return False


class PerPromptTap(_Tap):
    """Mode a: project each parameter's gradient right after it accumulates, then free it.

    Args:
        model: this rank's model stage.
        layouts: ``{local_name: ParamLayout}`` of the parameters to score.
        projector: a :class:`~megatron_cropi.projection.base.Projector`.
        partial: ``[num_rows, k]`` float32 accumulator.
    """

    def __init__(self, model, layouts: dict[str, ParamLayout], projector, partial: torch.Tensor):
        super().__init__(model)
        self.layouts, self.projector, self.partial = layouts, projector, partial
        self.current_row: int | None = None

    def on_stage_output(self, output: torch.Tensor, row: int) -> None:
        """Call in the forward step: the backward reaching ``output`` belongs to ``row``."""

        def mark(grad, row=row):
            self.current_row = row
            return grad

        if output.requires_grad:
            output.register_hook(mark)

    def _hook(self, layout: ParamLayout) -> Callable:
        def hook(param):
            if param.grad is None:
                return
            if layout.projects_raw_grad:
                if self.current_row is None:
                    raise RuntimeError("gradient arrived before any micro-batch output was marked")
                rows = torch.tensor([self.current_row], device=self.partial.device)
                _project_into(self.partial, rows, self.projector, layout, param.grad.unsqueeze(0))
            param.grad = None

        return hook

    def __enter__(self):
        # Under megatron DDP this hook runs before DDP's gradient-accumulation hook and leaves
        # ``param.grad`` None, so DDP adds nothing to its ``main_grad`` buffers (tested).
        self._set_trainable(lambda name: name in self.layouts)
        for name, p in self.model.named_parameters():
            if name in self.layouts:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(self.layouts[name])))
        return self


class BatchedTap(_Tap):
    """Mode b: per-prompt gradients from one frozen-weight backward over many prompts.

    Args:
        model: this rank's model stage (local layer spec: Column/RowParallelLinear, torch norms,
            VocabParallelEmbedding).
        layouts: ``{local_name: ParamLayout}`` of the parameters to score.
        projector: a :class:`~megatron_cropi.projection.base.Projector`.
        partial: ``[num_rows, k]`` float32 accumulator.
        responses_per_prompt: K (sequences per group, consecutive in the batch).
        restart_at_embedding: make the embedding output a leaf that requires grad (the graph's root:
            every weight is frozen); False when a truncated backward (:mod:`megatron_cropi.popi.truncate`)
            roots the graph higher up, so that the layers below build no graph at all.
        block_bytes: bound of one block of per-prompt gradient (:mod:`megatron_cropi.popi.blocks`).

    Raises:
        UnsupportedParameterError: a scored parameter lives in a module the tap cannot see (e.g. a
            Transformer Engine layer); use capture mode ``per_prompt`` for it.
    """

    def __init__(self, model, layouts: dict[str, ParamLayout], projector, partial: torch.Tensor,
                 responses_per_prompt: int, *, restart_at_embedding: bool = True, block_bytes: int = BLOCK_BYTES):
        from megatron.core.tensor_parallel.layers import (
            ColumnParallelLinear,
            RowParallelLinear,
            VocabParallelEmbedding,
        )

        super().__init__(model)
        self._column_cls = ColumnParallelLinear
        self.block_bytes = block_bytes
        self.layouts, self.projector, self.partial = layouts, projector, partial
        self.k = responses_per_prompt
        self.restart_at_embedding = restart_at_embedding
        self.rows_of: dict[int, torch.Tensor] = {}  # micro-batch id -> [G] partial rows
        self.current_mb: int | None = None  # the forward step's micro-batch
        self.backward_mb: int | None = None  # the micro-batch whose backward runs (set by on_stage_output)
        by_param = {id(p): layouts[n] for n, p in model.named_parameters() if n in layouts}
        self._by_param = by_param
        covered: set[int] = set()
        self._modules: list[tuple[str, torch.nn.Module]] = []
        for _, m in model.named_modules():
            kind = None
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
                kind = "linear"
            elif isinstance(m, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
                kind = "norm"
            elif isinstance(m, VocabParallelEmbedding):
                kind = "embedding"
            if kind is None:
                continue
            self._modules.append((kind, m))
            for p in m.parameters(recurse=False):
                covered.add(id(p))
        missing = [n for n, p in model.named_parameters() if n in layouts and id(p) not in covered]
        if missing:
            raise UnsupportedParameterError(
                "batched capture cannot reach parameters " + ", ".join(missing)
                + "; use scoring.mode: per_prompt or exclude them with scoring.exclude_params"
            )

    # -- bookkeeping -------------------------------------------------------------------------------
    def begin_microbatch(self, mb_id: int, rows: torch.Tensor) -> None:
        """Call in the forward step before the model runs: rows of this micro-batch's groups."""
        self.rows_of[mb_id] = rows
        self.current_mb = mb_id

    def on_stage_output(self, output: torch.Tensor, mb_id: int) -> None:
        """Call in the forward step with the stage's output: the backward reaching it is ``mb_id``'s."""

        def mark(grad, mb_id=mb_id):
            self.backward_mb = mb_id
            return grad

        if output.requires_grad:
            output.register_hook(mark)

    def _tag(self) -> int:
        """The micro-batch of the tensors a forward hook sees now (module docstring, *Attribution*)."""
        if torch._C._current_autograd_node() is None:
            return self.current_mb
        if self.backward_mb is None:
            raise RuntimeError("a layer's forward ran inside a backward (activation recomputation) before any "
                               "stage output's gradient arrived: call BatchedTap.on_stage_output in the forward step")
        return self.backward_mb

    def _add(self, param, mb_id: int, grads: torch.Tensor) -> None:
        layout = self._projected(param)
        if layout is None:
            return
        rows = self.rows_of[mb_id]
        g = rows.numel()
        _project_into(self.partial, rows, self.projector, layout, grads[:g])

    def _projected(self, param) -> ParamLayout | None:
        """``param``'s layout when this rank projects it (scored, and its raw gradient counted here)."""
        layout = self._by_param.get(id(param))
        return layout if layout is not None and layout.projects_raw_grad else None

    def _blocks_into(self, mb_id: int, spec: ShardSpec, first_row: int) -> Callable:
        """An ``emit`` for :mod:`~megatron_cropi.popi.per_sample`'s blocked forms: project the block of
        prompts ``g0:g1`` and local rows ``r0:r1`` (``first_row``: the local row where ``spec`` starts)."""
        rows = self.rows_of[mb_id]

        def emit(g0, g1, r0, r1, *blocks):
            block = next(b for b in blocks if b is not None)
            sub = _row_block(spec, r0 - first_row, r1 - r0)
            self.partial.index_add_(0, rows[g0:g1], self.projector.project(block, sub).to(self.partial.device))

        return emit

    # -- hooks -------------------------------------------------------------------------------------
    def _linear_hook(self, module, args, kwargs, output):
        x = args[0] if args else kwargs["input_"]
        weight = kwargs.get("weight") if kwargs.get("weight") is not None else module.weight
        bias = getattr(module, "bias", None)
        y = output[0] if isinstance(output, tuple) else output
        if not y.requires_grad:
            return
        mb = self._tag()
        # Sequence parallelism (module docstring, *Sequence parallelism*): which side is a shard.
        sp = bool(getattr(module, "sequence_parallel", False))
        column = isinstance(module, self._column_cls)

        def on_grad(dy, x=x, weight=weight, bias=bias, mb=mb):
            g = self.rows_of[mb].numel()
            if id(weight) in self._by_param:
                xw, dyw = x.detach(), dy
                if sp and column:
                    xw = gather_sequence(xw, module.tp_group)
                elif sp:
                    dyw = gather_sequence(dy, module.tp_group)
                layout = self._projected(weight)
                for (rs, cs), spec in (layout.pieces if layout is not None else ()):
                    linear_grad_blocks(xw[..., cs], dyw, self.k, g, (rs.start, rs.stop),
                                       self._blocks_into(mb, spec, rs.start), block_bytes=self.block_bytes)
                del xw, dyw
            layout = self._projected(bias) if isinstance(bias, torch.nn.Parameter) else None
            # a row-parallel bias under SP: this rank's positions (dy), a TP partial (ParamLayout)
            for (rs,), spec in (layout.pieces if layout is not None else ()):
                linear_grad_blocks(dy, dy, self.k, g, (rs.start, rs.stop), self._blocks_into(mb, spec, rs.start),
                                   weight=False, bias=True, block_bytes=self.block_bytes)

        y.register_hook(on_grad)

    def _norm_hook(self, module, args, output):
        x = args[0]
        if not output.requires_grad:
            return
        mb = self._tag()
        kind = "RMSNorm" if isinstance(module, torch.nn.RMSNorm) else "LayerNorm"
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps

        def on_grad(dy, x=x, mb=mb):
            if self._projected(module.weight) is None and self._projected(getattr(module, "bias", None)) is None:
                return
            dgamma, dbeta = norm_grads_chunked(x.detach(), dy, self.k, self.rows_of[mb].numel(), kind=kind, eps=eps,
                                               block_bytes=self.block_bytes)
            if module.weight is not None:
                self._add(module.weight, mb, dgamma)
            if dbeta is not None and getattr(module, "bias", None) is not None:
                self._add(module.bias, mb, dbeta)

        output.register_hook(on_grad)

    def _embedding_hook(self, module, args, output):
        if not self.restart_at_embedding:
            return None
        ids = args[0]
        mb = self._tag()
        # Parameters are frozen, so nothing upstream requires grad: restart the graph here to get
        # the gradient of the looked-up rows.
        out = output.detach().requires_grad_(True)

        scattered = bool(getattr(module, "reduce_scatter_embeddings", False))

        def on_grad(dy, ids=ids, mb=mb):
            if id(module.weight) not in self._by_param:
                return
            if scattered:  # SP: [s/t, N, h] of this rank's positions -> [N, s, h]
                dy = gather_sequence(dy, module.tp_group).transpose(0, 1)
            layout = self._projected(module.weight)
            for (rs, _), spec in (layout.pieces if layout is not None else ()):
                embedding_grad_blocks(ids, dy, self.k, self.rows_of[mb].numel(), self._blocks_into(mb, spec, rs.start),
                                      vocab_start=module.vocab_start_index,
                                      vocab_size_local=module.num_embeddings_per_partition,
                                      block_bytes=self.block_bytes)

        out.register_hook(on_grad)
        return out

    def __enter__(self):
        self._set_trainable(lambda name: False)  # frozen: Megatron's linears skip the weight-gradient GEMM
        for kind, m in self._modules:
            if kind == "linear":
                self._handles.append(m.register_forward_hook(self._linear_hook, with_kwargs=True))
            elif kind == "norm":
                self._handles.append(m.register_forward_hook(self._norm_hook))
            else:
                self._handles.append(m.register_forward_hook(self._embedding_hook))
        return self

    def __exit__(self, *exc):
        self.rows_of.clear()
        return super().__exit__(*exc)
