"""Projected per-prompt POPI gradients from a Megatron model under any TP/PP layout.

:class:`PopiCapture` runs the POPI loss (:mod:`megatron_cropi.popi.loss`) through Megatron's own
schedule (:func:`megatron_cropi.model.schedule.forward_backward`), with a gradient tap
(:mod:`megatron_cropi.popi.hooks`) that projects each rank's gradient shards as they appear. The
partial k-vectors are then summed over the TP group and then the PP group: only ``[prompts, k]``
floats ever cross ranks.

Modes (must agree to float error):

* ``per_prompt`` (a): one prompt per micro-batch, one backward each.
* ``batched`` (b): many prompts per micro-batch; frozen weights; per-prompt gradients formed per layer
  from its input and output gradient.

With ``truncate_backward`` the backward stops below the lowest scored module
(:mod:`megatron_cropi.popi.truncate`); the sketches are those of the full backward.

Under sequence parallelism (local spec) both modes hold; micro-batches are padded to a length TP
divides (:func:`~megatron_cropi.popi.batch.pad_sequence_length`).

**Interleaved schedule** (virtual pipeline, V chunks per stage: pass the list of
:func:`~megatron_cropi.model.provider.build_model_chunks`). Each chunk gets its own tap (and cut), all
adding into one ``partial``; each chunk's data iterator yields every micro-batch in order, tagged with
the chunk. Attribution needs nothing new: every chunk output carries its own micro-batch mark, and
Megatron still runs one chunk's backward at a time, so a chunk's hooks book to the micro-batch whose
backward reaches that chunk (``hooks.py``, *Attribution*), however far the schedule's forwards have run
ahead (warm-up of ``2(P − r − 1) + (V − 1)·P`` forwards on rank r). Megatron needs the number of
micro-batches M to be a multiple of P (its micro-batch groups of P per chunk): a call with another M is
padded with copies of its last micro-batch booked to a sink row that is then dropped (``M' − M`` more
forwards and backwards; the features are unchanged). The projection is per global parameter block and
summed, so a rank's non-contiguous layers (P = 2, V = 2, 4 layers: rank 0 holds layers 0 and 2) add up to
the same sketch as the 1F1B layout's (``tests/distributed/test_popi_capture_interleaved.py``).

Non-finite log-probs, losses or sketches flag the prompt (its sketch is zeroed) and the run goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from megatron_cropi.model.logprobs import DEFAULT_CHUNK_TOKENS, vocab_parallel_logprobs
from megatron_cropi.model.params import ParamLayout, param_layouts
from megatron_cropi.model.schedule import (
    as_chunks,
    broadcast_from_last_stage,
    causal_attention_mask,
    forward_backward,
    scale_for_schedule,
)
from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.popi.batch import PopiMicrobatch, pad_sequence_length
from megatron_cropi.popi.blocks import BLOCK_BYTES
from megatron_cropi.popi.hooks import BatchedTap, PerPromptTap
from megatron_cropi.popi.loss import PopiLossConfig, popi_group_losses
from megatron_cropi.popi.truncate import BackwardCut, lowest_scored_position
from megatron_cropi.projection.reduce import reduce_sketch

__all__ = ["CaptureOutput", "PopiCapture", "select_layouts", "pad_for_interleaving"]


@dataclass(frozen=True)
class CaptureOutput:
    """Result of one capture call.

    Attributes:
        sketches: ``[R, k]`` float32 on CPU: projected POPI gradient of each row (zeros where not finite).
        finite: ``[R]`` bool: False where log-probs, loss or gradient were NaN/inf.
    """

    sketches: torch.Tensor
    finite: torch.Tensor


def select_layouts(model, groups: ParallelGroups, *, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
                   ) -> dict[str, ParamLayout] | list[dict[str, ParamLayout]]:
    """Layouts of the parameters to score: all, or those whose *global* name matches ``include``
    (regexes, any), minus ``exclude``. For a list of model chunks (interleaved schedule), one such dict
    per chunk (local names repeat across chunks; global names do not)."""
    import re

    if isinstance(model, (list, tuple)):
        return [select_layouts(chunk, groups, include=include, exclude=exclude) for chunk in model]

    out = {}
    for name, layout in param_layouts(model, groups).items():
        g = layout.global_name
        if include and not any(re.search(p, g) for p in include):
            continue
        if any(re.search(p, g) for p in exclude):
            continue
        out[name] = layout
    return out


@contextlib.contextmanager
def _plain_schedule(config):
    """No gradient finalisation or sync hooks during capture: a trainer may have installed DDP's
    (``finalize_model_grads`` expects DDP-wrapped modules, and there is nothing to reduce over DP)."""
    names = ("finalize_model_grads_func", "grad_sync_func", "param_sync_func", "no_sync_func")
    saved = {n: getattr(config, n, None) for n in names}
    for n in names:
        if hasattr(config, n):
            setattr(config, n, None)
    try:
        yield
    finally:
        for n, v in saved.items():
            if hasattr(config, n):
                setattr(config, n, v)


def pad_for_interleaving(microbatches: list[PopiMicrobatch], pp_size: int, sink_row: int
                         ) -> list[PopiMicrobatch]:
    """``microbatches`` padded to a multiple of ``pp_size`` with copies of the last one whose groups all
    book to ``sink_row`` (Megatron's interleaved schedule runs micro-batches in groups of PP per chunk and
    refuses a remainder, or fewer than PP in all). The copies carry the same shapes and a real loss, so
    the schedule and the taps treat them like any other micro-batch; only their row is thrown away."""
    short = -len(microbatches) % pp_size
    pad = dataclasses.replace(microbatches[-1], rows=[sink_row] * microbatches[-1].num_groups)
    return list(microbatches) + [pad] * short


class PopiCapture:
    """Captures projected per-prompt gradients of the POPI loss.

    Args:
        model: this rank's ``GPTModel`` stage, or the list of its chunks under the interleaved schedule.
        groups: process groups.
        projector: a :class:`~megatron_cropi.projection.base.Projector` (same seed on every rank).
        mode: ``"per_prompt"`` or ``"batched"``.
        loss_cfg: POPI loss options.
        temperature: T of the behaviour distribution; current log-probs use the same T so that
            ``ρ = 1`` at θ = β.
        layouts: parameters to score (default: all, :func:`select_layouts`); one dict per chunk for a
            list of chunks.
        truncate_backward: stop the backward below the lowest scored module (same sketches, less
            compute when only upper layers are scored). Construction is then a collective over the PP
            group.
        logprob_chunk_tokens: token positions per fp32 log-softmax chunk (``scoring.logprob_chunk_tokens``;
            0 = the whole micro-batch at once).
        block_bytes: batched mode: the bound of one block of per-prompt gradient and of one chunk of
            its factors (:mod:`megatron_cropi.popi.blocks`; the sketches do not depend on it).
    """

    def __init__(self, model, groups: ParallelGroups, projector, *, mode: Literal["per_prompt", "batched"],
                 loss_cfg: PopiLossConfig = PopiLossConfig(), temperature: float = 1.0,
                 layouts: dict[str, ParamLayout] | list[dict[str, ParamLayout]] | None = None,
                 truncate_backward: bool = False,
                 logprob_chunk_tokens: int = DEFAULT_CHUNK_TOKENS, block_bytes: int = BLOCK_BYTES):
        if mode not in ("per_prompt", "batched"):
            raise ValueError(f"capture mode must be 'per_prompt' or 'batched', got {mode!r}")
        self.model, self.groups, self.projector = model, groups, projector
        self.chunks = as_chunks(model)
        self.mode, self.loss_cfg, self.temperature = mode, loss_cfg, temperature
        self.layouts = layouts if layouts is not None else select_layouts(model, groups)
        self.chunk_layouts = list(self.layouts) if isinstance(self.layouts, (list, tuple)) else [self.layouts]
        if len(self.chunk_layouts) != len(self.chunks):
            raise ValueError(f"{len(self.chunks)} model chunks but {len(self.chunk_layouts)} layout dicts")
        self.logprob_chunk_tokens = logprob_chunk_tokens
        self.block_bytes = block_bytes
        self.lowest = (lowest_scored_position(self.chunks, groups, self.chunk_layouts) if truncate_backward
                       else 0)

    def run(self, microbatches: list[PopiMicrobatch], num_rows: int, responses_per_prompt: int) -> CaptureOutput:
        """Capture the groups of ``microbatches``; ``mb.rows`` index ``[0, num_rows)``.

        Every rank of a model-parallel group must pass the same micro-batches.
        """
        if not microbatches:
            return CaptureOutput(torch.zeros(0, self.projector.k), torch.zeros(0, dtype=torch.bool))
        g = self.groups
        device = g.device
        k = responses_per_prompt
        seq = microbatches[0].tokens.shape[1]
        n_seq = microbatches[0].tokens.shape[0]
        if any(mb.tokens.shape[1] != seq or (g.pp_size > 1 and mb.tokens.shape[0] != n_seq) for mb in microbatches):
            raise ValueError("one capture call needs one sequence length (and under PP one micro-batch size: the "
                             "stages exchange one activation shape), got "
                             f"{sorted({tuple(mb.tokens.shape) for mb in microbatches})}")
        if self.mode == "per_prompt" and any(mb.num_groups != 1 or n_seq != k for mb in microbatches):
            raise ValueError("per_prompt capture needs exactly one prompt (K sequences) per micro-batch")
        config = self.chunks[0].config  # one TransformerConfig shared by every chunk
        if getattr(config, "sequence_parallel", False) and seq % g.tp_size:
            # sequence parallelism splits positions TP ways; padded positions change no gradient
            seq += g.tp_size - seq % g.tp_size
            microbatches = [pad_sequence_length(mb, seq) for mb in microbatches]
        interleaved = len(self.chunks) > 1
        rows_out = num_rows
        if interleaved and len(microbatches) % g.pp_size:
            microbatches = pad_for_interleaving(microbatches, g.pp_size, sink_row=num_rows)
            num_rows += 1  # the sink row, dropped below
        partial = torch.zeros(num_rows, self.projector.k, dtype=torch.float32, device=device)
        finite_rows = torch.ones(num_rows, dtype=torch.bool, device=device)
        mask = causal_attention_mask(seq, device)
        num_mb = len(microbatches)
        # one tap (and cut) per chunk, all adding into ``partial``: each keeps its own chunk's marks
        taps = [PerPromptTap(chunk, layouts, self.projector, partial) if self.mode == "per_prompt"
                else BatchedTap(chunk, layouts, self.projector, partial, k,
                                restart_at_embedding=self.lowest <= 0, block_bytes=self.block_bytes)
                for chunk, layouts in zip(self.chunks, self.chunk_layouts)]
        cuts = [BackwardCut(chunk, self.lowest, root=self.mode == "batched") if self.lowest > 0
                else contextlib.nullcontext() for chunk in self.chunks]

        def forward_step(data_iterator, model):
            chunk_id, mb_id, mb = next(data_iterator)
            tap = taps[chunk_id]
            mb = mb.to(device)
            rows = torch.tensor(mb.rows, dtype=torch.long, device=device)
            if isinstance(tap, BatchedTap):
                tap.begin_microbatch(mb_id, rows)
            out = model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=mask)
            # both taps learn from the stage output's gradient which micro-batch's backward runs
            tap.on_stage_output(out, mb.rows[0] if isinstance(tap, PerPromptTap) else mb_id)

            def loss_func(logits):
                logp = vocab_parallel_logprobs(logits, mb.labels, tp_group=g.tp, tp_rank=g.tp_rank,
                                               temperature=self.temperature, chunk_tokens=self.logprob_chunk_tokens)
                # A non-finite log-prob flags its prompt; its terms are cut out of the graph so the
                # backward of the other prompts in the batch stays clean.
                bad_tok = ~torch.isfinite(logp) & (mb.mask > 0)
                gid = mb.group_index.clamp(min=0)
                bad_group = torch.zeros(mb.num_groups + 1, dtype=torch.bool, device=device)
                bad_group.index_put_((gid[bad_tok.any(-1)],), torch.tensor(True, device=device))
                bad_seq = bad_group[gid] & (mb.group_index >= 0)
                logp = torch.where(bad_seq[:, None], torch.zeros_like(logp).detach(), logp)
                blp = torch.where(bad_seq[:, None], torch.zeros_like(logp), mb.behaviour_logprobs)
                gindex = torch.where(bad_seq, torch.full_like(mb.group_index, -1), mb.group_index)
                losses = popi_group_losses(logp, blp, mb.mask, mb.rewards, gindex, mb.num_groups, self.loss_cfg)
                ok = torch.isfinite(losses) & ~bad_group[: mb.num_groups]
                total = torch.where(ok, losses, torch.zeros_like(losses)).sum()
                return scale_for_schedule(total, num_mb), {"rows": rows, "ok": ok.detach().clone()}

            return out, loss_func

        # every chunk sees every micro-batch, in order (the interleaved schedule wants one iterator each)
        iterators = [iter([(c, i, mb) for i, mb in enumerate(microbatches)]) for c in range(len(self.chunks))]
        with contextlib.ExitStack() as stack:
            for cm in (*taps, *cuts, _plain_schedule(config)):
                stack.enter_context(cm)
            reduced = forward_backward(self.chunks if interleaved else self.chunks[0], g,
                                       forward_step_func=forward_step,
                                       data_iterator=iterators if interleaved else iterators[0],
                                       num_microbatches=num_mb, seq_length=seq, micro_batch_size=n_seq)
        if g.is_last_stage:
            for item in reduced:
                finite_rows[item["rows"]] = item["ok"]
        finite_rows = broadcast_from_last_stage(finite_rows.to(torch.uint8), g, shape=(num_rows,),
                                                dtype=torch.uint8).bool()
        sketches = reduce_sketch(partial, g)
        finite_rows &= torch.isfinite(sketches).all(dim=-1)
        sketches = torch.where(finite_rows[:, None], sketches, torch.zeros_like(sketches))
        return CaptureOutput(sketches[:rows_out].cpu(), finite_rows[:rows_out].cpu())
