"""One GRPO step under sequence parallelism (TP = 2, local spec) equals the step on one rank (fp32, 1e-5).

Under SP the norms' weight gradients are partial sums over each rank's positions, which megatron's
``finalize_model_grads`` all-reduces over TP only for parameters flagged ``sequence_parallel`` (set by
:class:`~megatron_cropi.model.provider.SequenceParallelTorchNorm`); and every micro-batch length must
be a multiple of TP. Responses of up to 3 tokens after 14-token prompts give groups of 17 tokens:
an odd step length, and with length-aware micro-batches (``length_multiple: 1``) odd micro-batch
lengths, which the learner rounds up to 18. The rollouts come from the 1-rank run (the native sampler does not run under SP).
"""

import pytest

from megatron_cropi.testing.spawn import run_ranks

from test_grpo_layouts import GRPO  # noqa: E402  (tests/distributed on sys.path)

MODEL = {"vocab_size": 32}
SP_MODEL = {"vocab_size": 32, "layer_spec": "local", "transformer": {"sequence_parallel": True}}


def _sampling():
    from megatron_cropi.records import SamplingParams

    return SamplingParams(n=8, temperature=1.0, max_tokens=3, seed=5)


def _reference_worker(grpo):
    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.testing.grpo_tiny import build_tiny_trainer, easy_prompts

    init_distributed()
    g = build_parallel_groups(1, 1)
    trainer = build_tiny_trainer(g, grpo, model=MODEL, sampling=_sampling())
    rollouts = trainer.collector.collect(easy_prompts(2)[:grpo["prompts_per_step"]], trainer.sampling)
    before = assemble_global_tensors(trainer.model, g, attr="data")
    metrics = trainer.train_on_rollouts(rollouts, list(range(len(rollouts))))
    return rollouts, before, assemble_global_tensors(trainer.model, g, attr="data"), metrics


def _sp_worker(grpo, rollouts):
    import torch.distributed as dist

    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.testing.grpo_tiny import build_tiny_trainer

    init_distributed()
    g = build_parallel_groups(2, 1)
    trainer = build_tiny_trainer(g, grpo, model=SP_MODEL, sampling=_sampling())
    assert trainer.model.config.sequence_parallel
    metrics = trainer.train_on_rollouts(rollouts, list(range(len(rollouts))))
    params = assemble_global_tensors(trainer.model, g, attr="data", dst=0)
    return (params, metrics) if dist.get_rank() == 0 else None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("length_aware", [False, True], ids=["one-length", "length-aware"])
def test_grpo_step_sequence_parallel_tp2_matches_one_rank(length_aware):
    grpo = {**GRPO, "length_aware_microbatches": length_aware, "length_multiple": 1}
    rollouts, before, ref, ref_metrics = run_ranks(_reference_worker, 1, args=(grpo,), timeout_s=200)[0]
    longest = [max(len(g.prompt.token_ids) + len(r.token_ids) for r in g.responses) for g in rollouts]
    assert any(n % 2 for n in longest), f"no odd length to round up: {longest}"
    assert ref_metrics["updates"] == 2 and ref_metrics["skipped"] == 0
    moved = max((ref[n] - before[n]).abs().max().item() for n in ref)
    assert moved > 1e-3, f"the step barely moved the weights ({moved:.2e}): the comparison would be vacuous"
    norms = [n for n in ref if n.endswith("layernorm.weight")]
    assert norms and all((ref[n] - before[n]).abs().max() > 1e-4 for n in norms)

    params, metrics = run_ranks(_sp_worker, 2, args=(grpo, rollouts), timeout_s=280)[0]
    assert set(params) == set(ref)
    errs = {name: (params[name] - want).abs().max().item() for name, want in ref.items()}
    print("max |Δθ| under SP:", f"{max(errs.values()):.2e}")
    bad = {n: e for n, e in errs.items() if not e <= 1e-5}
    assert not bad, f"GRPO under sequence parallelism off the 1-rank step: {bad}"
    for key in ("kl", "entropy", "pg_loss", "grad_norm", "response_tokens"):
        assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-6), key
