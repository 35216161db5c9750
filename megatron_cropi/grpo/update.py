"""One GRPO policy update from a batch of scored rollout groups, through Megatron's schedule.

:meth:`PolicyLearner.update` takes this data-parallel rank's rollout groups (every rank of a TP/PP
replica passes the same ones) with their positions in the step's global prompt batch, and:

1. drops zero-variance groups (all K rewards equal: advantage 0, no policy gradient) when
   ``drop_zero_variance_groups`` (the default; kept in the batch and the token-mean otherwise, as verl
   does); if no group of the whole step is left, the step is *skipped* (no optimizer step) and reported;
2. splits the groups into ``updates_per_step`` mini-batches by global position (``position % U``, so
   the split does not depend on the DP size) and packs each into fixed-shape micro-batches
   (:func:`megatron_cropi.popi.batch.pack_microbatches`: ``micro_batch_prompts × K`` rows, one
   sequence length for the whole step; with ``length_aware_microbatches`` at PP = 1 the groups are
   sorted by length and each micro-batch is padded to its own longest); under sequence parallelism
   every length is a multiple of TP (megatron splits positions TP ways);
3. before any update, computes the reference policy's log-probs (KL > 0) and, when configured, the
   old policy's by forward-only passes;
4. per mini-batch: counts the response tokens and sequences over all DP ranks
   (:class:`~megatron_cropi.grpo.loss.LossNormalizer`), runs forward/backward over the micro-batches
   with each loss multiplied by ``num_microbatches × dp`` (Megatron divides by the first, DDP by the
   second), so the reduced gradient is exactly that of the step's global loss; then the optimizer
   step (clip, update) and the LR schedule.

NaN guard: after the backward (and the DP reduction) every rank checks its gradient buffers for
NaN/inf and the flags are OR-ed over the whole world, so every rank agrees; a non-finite gradient
skips that optimizer step (weights, optimizer state and LR schedule untouched), counted in
``nonfinite_updates``. megatron-core's clip does not catch NaN (the norm is NaN and so is every
clipped gradient) and its bf16/fp32 optimizers do not check. fp16 models use Megatron's dynamic loss
scaler instead: the loss is multiplied by the scale (``grad_scale_func``, set for the update only) and
the optimizer unscales, detects overflow, skips the step and lowers the scale; that skip is counted the
same way.

Group-normalised advantages (``popi.loss.group_advantages``) are computed per micro-batch: a group
never straddles two micro-batches.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_cropi.grpo.config import GrpoConfig
from megatron_cropi.grpo.loss import MISMATCH_KEYS, STAT_KEYS, LossNormalizer, finalize_stats, grpo_loss
from megatron_cropi.grpo.optimizer import current_lr, dp_loss_scale, loss_scaler
from megatron_cropi.grpo.reference import ReferencePolicy, forward_logprobs
from megatron_cropi.model.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs
from megatron_cropi.model.schedule import broadcast_from_last_stage, causal_attention_mask, forward_backward, scale_for_schedule
from megatron_cropi.parallel import ParallelGroups
from megatron_cropi.popi.batch import PopiMicrobatch, pack_microbatches
from megatron_cropi.popi.buckets import group_lengths
from megatron_cropi.popi.loss import group_advantages
from megatron_cropi.records import RolloutGroup

__all__ = ["PolicyLearner"]


def _allreduce(values: list[float], groups: ParallelGroups, op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=groups.device)
    if groups.dp_size > 1:
        dist.all_reduce(t, op=op, group=groups.dp)
    return t.tolist()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padding_microbatch(rows: int, seq: int) -> PopiMicrobatch:
    """A micro-batch with no response token (a DP rank with nothing to train still joins the reduction)."""
    zeros = torch.zeros(rows, seq, dtype=torch.int64)
    return PopiMicrobatch(tokens=zeros, position_ids=torch.arange(seq).expand(rows, seq).contiguous(),
                          labels=zeros.clone(), mask=torch.zeros(rows, seq), behaviour_logprobs=torch.zeros(rows, seq),
                          rewards=torch.zeros(rows), group_index=torch.full((rows,), -1, dtype=torch.int64), rows=[])


class PolicyLearner:
    """Applies GRPO updates to a DDP-wrapped policy with a megatron-core optimizer.

    Args:
        model: the policy stage wrapped by :func:`~megatron_cropi.grpo.optimizer.wrap_ddp`.
        optimizer, scheduler: from :func:`~megatron_cropi.grpo.optimizer.build_optimizer`.
        groups: this rank's process groups.
        cfg: the GRPO configuration.
        reference: the frozen reference policy (required when ``cfg.loss.kl_coef > 0``).
        pad_id: token id used to pad sequences.
    """

    def __init__(self, model, optimizer, scheduler, groups: ParallelGroups, cfg: GrpoConfig, *,
                 reference: ReferencePolicy | None = None, pad_id: int = 0):
        if cfg.loss.kl_coef > 0 and reference is None:
            raise ValueError("grpo.loss.kl_coef > 0 needs a reference policy")
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.groups, self.cfg, self.reference, self.pad_id = groups, cfg, reference, pad_id
        self.loss_scaled = loss_scaler(optimizer) is not None
        self.after_backward: Callable[[object], None] | None = None
        """Fault injection (tests): called with the DDP model after each backward, before the NaN check."""

    # -- batch layout ------------------------------------------------------------------------------
    def _shape(self, live: Sequence[RolloutGroup]) -> tuple[int, int]:
        k = max((len(g.responses) for g in live), default=1)
        s = max((len(g.prompt.token_ids) + len(r.token_ids) for g in live for r in g.responses), default=2)
        k, s = _allreduce([k, s], self.groups, op=dist.ReduceOp.MAX)
        return int(k), _round_up(int(s), self._length_unit())

    def _length_unit(self) -> int:
        """TP under sequence parallelism (positions split TP ways), else 1."""
        return self.groups.tp_size if getattr(self.model.config, "sequence_parallel", False) else 1

    def _minibatches(self, live, positions, k: int, seq: int) -> list[list[PopiMicrobatch]]:
        u_count, per_mb = self.cfg.updates_per_step, self.cfg.micro_batch_prompts
        by_length = self.cfg.length_aware_microbatches and self.groups.pp_size == 1
        out = []
        for u in range(u_count):
            idx = [i for i, pos in enumerate(positions) if pos % u_count == u]
            if by_length:  # shortest groups first; each micro-batch padded to its own longest
                lengths = group_lengths([live[i] for i in idx])
                idx = [idx[j] for j in np.argsort(lengths, kind="stable")]
            mbs = []
            for start in range(0, len(idx), per_mb):
                chunk = idx[start:start + per_mb]
                mb_seq = seq
                if by_length:
                    longest = int(group_lengths([live[i] for i in chunk]).max())
                    mb_seq = min(_round_up(_round_up(longest, self.cfg.length_multiple), self._length_unit()), seq)
                mbs += pack_microbatches([live[i] for i in chunk], [positions[i] for i in chunk],
                                         prompts_per_microbatch=per_mb, responses_per_prompt=k, seq_length=mb_seq,
                                         pad_id=self.pad_id)
            out.append(mbs or [_padding_microbatch(per_mb * k, seq)])
        return out

    # -- the update --------------------------------------------------------------------------------
    def update(self, rollouts: Sequence[RolloutGroup], positions: Sequence[int], *, temperature: float) -> dict:
        """Train on this rank's ``rollouts`` (global batch positions ``positions``); return step metrics.

        Metrics are identical on every rank: ``skipped`` (1 when no group was left to train on),
        ``groups``/``live_groups``, the token means of the loss terms, ``grad_norm``, ``lr``,
        ``updates`` and ``nonfinite_updates`` (optimizer steps taken / skipped for a NaN/inf gradient),
        ``loss_scale`` (fp16), and with recomputed old log-probs the engine/trainer mismatch
        (``rollout_logprob_abs_diff``, ``rollout_kl``; ``tis_*`` with TIS on).
        """
        g, cfg = self.groups, self.cfg
        if len(rollouts) != len(positions):
            raise ValueError(f"{len(rollouts)} rollout groups but {len(positions)} positions")
        keep = [i for i, grp in enumerate(rollouts) if not (cfg.drop_zero_variance_groups and grp.zero_variance)]
        live = [rollouts[i] for i in keep]
        live_pos = [int(positions[i]) for i in keep]
        n_groups, n_live, n_zero = _allreduce(
            [len(rollouts), len(live), sum(grp.zero_variance for grp in rollouts)], g)
        metrics = {"groups": n_groups, "live_groups": n_live, "zero_variance_groups": n_zero,
                   "lr": current_lr(self.optimizer)}  # the LR of this step's (first) update
        if n_live == 0:  # every group of the step had equal rewards and was dropped: no policy gradient
            metrics.update(skipped=1.0, updates=0.0, nonfinite_updates=0.0)
            return metrics
        k, seq = self._shape(live)
        minibatches = self._minibatches(live, live_pos, k, seq)
        # positions the forward computes (padding included): what length-aware packing saves
        metrics["padded_positions"] = _allreduce([float(sum(mb.tokens.numel() for mbs in minibatches for mb in mbs))],
                                                 g)[0]
        ref_lp = old_lp = None
        if self.reference is not None:
            ref_lp = [self.reference.logprobs(mbs, temperature=temperature, chunk_tokens=cfg.logprob_chunk_tokens)
                      for mbs in minibatches]
        if cfg.old_logprobs == "recompute":
            old_lp = [forward_logprobs(self.model, g, mbs, temperature=temperature, chunk_tokens=cfg.logprob_chunk_tokens)
                      for mbs in minibatches]
        sums = np.zeros(len(STAT_KEYS) + 1)
        grad_norms, updates, nonfinite = [], 0, 0
        self.model.train()
        for u, mbs in enumerate(minibatches):
            norm = LossNormalizer.from_masks([mb.mask for mb in mbs], g.dp if g.dp_size > 1 else None, device=g.device)
            if norm.tokens == 0:
                continue
            s, gn, ok = self._train_minibatch(mbs, norm, temperature, None if ref_lp is None else ref_lp[u],
                                              None if old_lp is None else old_lp[u])
            sums += s
            if ok:
                updates += 1
                grad_norms.append(gn)
            else:
                nonfinite += 1
        sums_t = torch.tensor(sums, dtype=torch.float64, device=g.device)
        if g.dp_size > 1:
            dist.all_reduce(sums_t, group=g.dp)
        sums_t = broadcast_from_last_stage(sums_t, g, shape=sums_t.shape, dtype=sums_t.dtype)
        stat = dict(zip(STAT_KEYS, sums_t[:-1].tolist()))
        final = finalize_stats(stat)
        if cfg.old_logprobs != "recompute":  # old log-probs are the engine's own: no mismatch to report
            final = {k: v for k, v in final.items() if k not in MISMATCH_KEYS}
        elif cfg.loss.tis_imp_ratio_cap is None:
            final = {k: v for k, v in final.items() if not k.startswith("tis_")}
        metrics.update(final)
        metrics.update(skipped=0.0, updates=float(updates), nonfinite_updates=float(nonfinite),
                       loss=float(sums_t[-1]) / max(1, len(minibatches)),
                       grad_norm=float(np.mean(grad_norms)) if grad_norms else float("nan"))
        if self.loss_scaled:
            metrics["loss_scale"] = float(loss_scaler(self.optimizer).scale)
        return metrics

    def _grads_finite(self) -> bool:
        """Whether every gradient of every rank is finite (a world-wide collective)."""
        bufs = list(getattr(self.model, "buffers", [])) + list(getattr(self.model, "expert_parallel_buffers", []))
        grads = [b.grad_data for b in bufs] or [p.main_grad for p in self.model.parameters() if hasattr(p, "main_grad")]
        bad = torch.zeros(1, dtype=torch.float32, device=self.groups.device)
        for t in grads:
            bad += (~torch.isfinite(t)).any().float()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips together (TP/PP/DP shards differ)
        return bad.item() == 0

    def _train_minibatch(self, mbs: list[PopiMicrobatch], norm: LossNormalizer, temperature: float,
                         ref_lp: list[torch.Tensor] | None, old_lp: list[torch.Tensor] | None):
        g, lcfg, chunk = self.groups, self.cfg.loss, self.cfg.logprob_chunk_tokens
        device = g.device
        num_mb, seq, rows = len(mbs), max(mb.tokens.shape[1] for mb in mbs), mbs[0].tokens.shape[0]
        masks = {n: causal_attention_mask(n, device) for n in {mb.tokens.shape[1] for mb in mbs}}
        scale = dp_loss_scale(g)
        sums = np.zeros(len(STAT_KEYS) + 1)

        def forward_step(data_iterator, model):
            i, mb = next(data_iterator)
            mb = mb.to(device)
            out = model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=masks[mb.tokens.shape[1]])

            def loss_func(logits):
                logp = vocab_parallel_logprobs(logits, mb.labels, tp_group=g.tp, tp_rank=g.tp_rank,
                                               temperature=temperature, chunk_tokens=chunk)
                if lcfg.entropy_coef > 0:
                    ent = vocab_parallel_entropy(logits, tp_group=g.tp, temperature=temperature, chunk_tokens=chunk)
                else:
                    with torch.no_grad():
                        ent = vocab_parallel_entropy(logits.detach(), tp_group=g.tp, temperature=temperature,
                                                     chunk_tokens=chunk)
                adv = group_advantages(mb.rewards, mb.group_index, max(mb.num_groups, 1), eps=lcfg.adv_eps)
                old = mb.behaviour_logprobs if old_lp is None else old_lp[i].to(device)
                rollout = None if old_lp is None else mb.behaviour_logprobs  # the engine's, for mismatch/TIS
                ref = None if ref_lp is None else ref_lp[i].to(device)
                loss, stat = grpo_loss(logp, old, adv, mb.mask, lcfg, norm, ref_logprobs=ref, entropy=ent,
                                       rollout_logprobs=rollout)
                packed = torch.stack([stat[k] for k in STAT_KEYS] + [loss.detach().to(torch.float64)])
                return scale_for_schedule(loss * scale, num_mb), {"stats": packed}

            return out, loss_func

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        config = self.model.config
        # the loss scale applies to this backward only: other backwards on the same model (POPI capture)
        # want unscaled gradients
        config.grad_scale_func = self.optimizer.scale_loss if self.loss_scaled else None
        try:
            reduced = forward_backward(self.model, g, forward_step_func=forward_step,
                                       data_iterator=iter(list(enumerate(mbs))), num_microbatches=num_mb,
                                       seq_length=seq, micro_batch_size=rows)
        finally:
            config.grad_scale_func = None
        for item in reduced:
            sums += item["stats"].cpu().numpy()
        if self.after_backward is not None:
            self.after_backward(self.model)
        # with a loss scaler the optimizer checks (and must see the overflow to lower the scale)
        if not self.loss_scaled and not self._grads_finite():
            return sums, float("nan"), False
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(1)
        return sums, float(grad_norm) if grad_norm is not None else float("nan"), bool(ok)
