"""``grpo.length_aware_microbatches``: one GRPO step on groups of mixed lengths gives the same updated
parameters (1e-5) and loss terms as the padded packing, with fewer padded positions.

Responses of up to 8 tokens (every other group's cut to 1–4 tokens) give groups of different lengths;
each micro-batch holds 2 groups. The step has two mini-batches, a KL to the reference, the entropy bonus and
recomputed old log-probs: every forward the update runs sees the per-micro-batch lengths.
"""

import pytest

from megatron_cropi.testing.spawn import run_ranks

GRPO = {
    "steps": 1, "prompts_per_step": 8, "micro_batch_prompts": 2, "updates_per_step": 2,
    "old_logprobs": "recompute",
    "loss": {"kl_coef": 0.05, "entropy_coef": 0.01, "clip_eps_low": 0.2, "clip_eps_high": 0.28},
    "optim": {"lr": 3e-3, "adam_eps": 1e-6, "clip_grad": 0.5},
}


def _shortened(group, keep: int):
    """``group`` with every response cut to its first ``keep`` tokens (data of another length; the
    behaviour log-probs stay those of the kept tokens)."""
    import dataclasses

    return dataclasses.replace(group, responses=[dataclasses.replace(r, token_ids=r.token_ids[:keep],
                                                                     logprobs=r.logprobs[:keep],
                                                                     finished=r.finished and len(r.token_ids) <= keep)
                                                 for r in group.responses])


def _worker():
    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.records import SamplingParams
    from megatron_cropi.testing.grpo_tiny import build_tiny_trainer, easy_prompts

    init_distributed()
    g = build_parallel_groups(1, 1)
    sampling = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=5)
    out = {}
    rollouts = None
    for aware in (False, True):
        grpo = dict(GRPO, length_aware_microbatches=aware, length_multiple=1)
        trainer = build_tiny_trainer(g, grpo, sampling=sampling)
        if rollouts is None:
            rollouts = trainer.collector.collect(easy_prompts(2)[:GRPO["prompts_per_step"]], trainer.sampling)
            rollouts = [_shortened(grp, 1 + i % 4) if i % 2 else grp for i, grp in enumerate(rollouts)]
        before = assemble_global_tensors(trainer.model, g, attr="data")
        metrics = trainer.train_on_rollouts(rollouts, list(range(len(rollouts))))
        out[aware] = (before, assemble_global_tensors(trainer.model, g, attr="data"), metrics)
    lengths = sorted({len(g.prompt.token_ids) + len(r.token_ids) for g in rollouts for r in g.responses})
    return out, lengths


@pytest.mark.timeout(300)
def test_length_aware_packing_equals_padded_packing_with_fewer_positions():
    out, lengths = run_ranks(_worker, 1, timeout_s=280)[0]
    assert len(lengths) > 2, f"the fixture's sequences barely differ in length ({lengths}): the test is vacuous"
    (before, padded, m_pad), (_, aware, m_aware) = out[False], out[True]
    moved = max((padded[n] - before[n]).abs().max().item() for n in padded)
    assert moved > 1e-3
    for name, want in padded.items():
        err = (aware[name] - want).abs().max().item()
        assert err <= 1e-5, f"{name} differs by {err:.3e}"
    for key in ("kl", "entropy", "pg_loss", "grad_norm", "response_tokens"):
        assert m_aware[key] == pytest.approx(m_pad[key], rel=1e-4, abs=1e-6), key
    assert m_aware["padded_positions"] < m_pad["padded_positions"]
