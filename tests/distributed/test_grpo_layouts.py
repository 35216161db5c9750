"""One GRPO step gives the same updated parameters (fp32, 1e-5) on 1 rank as on 2 ranks with TP=2,
with PP=2 and with DP=2 (distributed optimizer over DP).

The rollouts are generated once, by the native sampler on the 1-rank run, and the very same groups are
trained on in every layout. The step has two mini-batches (two optimizer updates), so the second one
sees importance ratios ≠ 1 (clipping, dual clip), a non-zero KL to the reference model, the entropy
bonus and active gradient clipping: every term of the loss and of the optimizer runs, and differs from
layout to layout only by float summation order. The same holds for a tiny Qwen3 (q/k norms, whose
gradients megatron sums over TP, and head_dim ≠ hidden/heads).
"""

import pytest

from megatron_cropi.testing.spawn import run_ranks

GRPO = {
    "steps": 1, "prompts_per_step": 8, "micro_batch_prompts": 2, "updates_per_step": 2,
    "old_logprobs": "recompute",  # a forward-only pass of the policy before the updates, in every layout
    "loss": {"kl_coef": 0.05, "entropy_coef": 0.01, "clip_eps_low": 0.2, "clip_eps_high": 0.28, "dual_clip_c": 3.0},
    # adam_eps 1e-6: Adam's first update g/(|g|+eps) turns a 1e-9 summation-order difference of a
    # near-zero gradient into lr·1e-9/eps; with eps=1e-8 that alone would exceed the 1e-5 tolerance.
    "optim": {"lr": 3e-3, "adam_eps": 1e-6, "clip_grad": 0.5, "weight_decay": 0.01},
}


def _reference_worker(grpo, model=None):
    import torch.distributed as dist

    from megatron_cropi.testing.grpo_tiny import build_tiny_trainer, easy_prompts
    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.parallel import build_parallel_groups, init_distributed

    init_distributed()
    g = build_parallel_groups(1, 1)
    trainer = build_tiny_trainer(g, grpo, model=model)
    prompts = easy_prompts(2)[:grpo["prompts_per_step"]]
    rollouts = trainer.collector.collect(prompts, trainer.sampling)
    before = assemble_global_tensors(trainer.model, g, attr="data")
    metrics = trainer.train_on_rollouts(rollouts, list(range(len(rollouts))))
    after = assemble_global_tensors(trainer.model, g, attr="data")
    assert dist.get_world_size() == 1
    return rollouts, before, after, metrics


def _layout_worker(grpo, rollouts, layouts, model=None):
    import torch.distributed as dist

    from megatron_cropi.testing.grpo_tiny import build_tiny_trainer
    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed

    init_distributed()
    out = {}
    for tp, pp in layouts:
        g = build_parallel_groups(tp, pp)
        trainer = build_tiny_trainer(g, grpo, model=model)
        per = len(rollouts) // g.dp_size
        mine = list(range(g.dp_rank * per, (g.dp_rank + 1) * per))
        metrics = trainer.train_on_rollouts([rollouts[i] for i in mine], mine)
        params = assemble_global_tensors(trainer.model, g, attr="data", dst=0)
        if dist.get_rank() == 0:
            out[(tp, pp)] = (params, metrics)
        destroy_parallel_groups()
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", [None, {"preset": "tiny-qwen3", "vocab_size": 32}], ids=["tiny", "tiny-qwen3"])
def test_grpo_step_tp2_pp2_dp2_match_one_rank(model):
    rollouts, before, ref, ref_metrics = run_ranks(_reference_worker, 1, args=(GRPO, model), timeout_s=200)[0]
    # the fixture carries signal: some groups have reward variance, and the step changed the weights
    assert any(not g.zero_variance for g in rollouts)
    assert ref_metrics["updates"] == 2 and ref_metrics["skipped"] == 0
    assert ref_metrics["kl"] > 0 and ref_metrics["clip_frac"] + ref_metrics["clip_frac_dual"] > 0
    assert ref_metrics["grad_norm"] > GRPO["optim"]["clip_grad"]  # clipping was active
    moved = max((ref[n] - before[n]).abs().max().item() for n in ref)
    assert moved > 1e-3, f"the step barely moved the weights ({moved:.2e}): the comparison would be vacuous"
    if model is not None:  # the q/k norms are there and trained (their TP partial gradients must add up)
        norms = [n for n in ref if n.endswith(("q_layernorm.weight", "k_layernorm.weight"))]
        assert len(norms) == 4 and all((ref[n] - before[n]).abs().max() > 1e-4 for n in norms)

    results = run_ranks(_layout_worker, 2, args=(GRPO, rollouts, [(2, 1), (1, 2), (1, 1)], model),
                        timeout_s=280)[0]
    for layout, (params, metrics) in results.items():
        assert set(params) == set(ref), f"{layout}: parameter names differ"
        for name, want in ref.items():
            err = (params[name] - want).abs().max().item()
            assert err <= 1e-5, f"layout TP,PP={layout}: {name} differs by {err:.3e}"
        for key in ("kl", "entropy", "pg_loss", "grad_norm", "response_tokens"):
            assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-4, abs=1e-6), (layout, key)
