"""GRPO with dynamic sampling (``grpo.dynamic_sampling``): a step drops the groups whose rewards are all
equal and refills its batch from the prompt stream, round by round, up to ``max_extra_rounds``.

The rewarder makes the oracle exact: prompts of the families in ``LIVE`` get alternating rewards
(1, 0, 1, 0, ...: always variance), every other prompt gets all zeros (never variance). So the kept
prompts of a step are, by hand, the first ``prompts_per_step`` LIVE prompts in the stream's order,
which the test replays itself. Checked:

* kept / dropped / surplus groups, extra rounds and the stream position equal that replay; the cap
  on extra rounds leaves a short batch; the counts reach TensorBoard (``train/kept_groups``, ...);
* the update equals a plain step (``train_on_rollouts``) of a second, identical policy on exactly the
  kept groups: same parameters, same loss terms;
* DP=2 (each rank rolls out half of every round and keeps an unequal share) equals DP=1 (1e-5);
* a run resumed from a mid-run checkpoint equals the uninterrupted run (parameters and data position).
"""

import pytest

from megatron_cropi.testing.spawn import run_ranks

LIVE = ("add1", "cmp", "max")
STEPS = 3
GRPO = {
    "steps": 4, "prompts_per_step": 4, "micro_batch_prompts": 1, "updates_per_step": 2,
    "dynamic_sampling": {"enabled": True, "max_extra_rounds": 10},
    "loss": {"kl_coef": 0.05, "entropy_coef": 0.01},
    "optim": {"lr": 3e-3, "adam_eps": 1e-6, "weight_decay": 0.01},
}
COUNTS = ("kept_groups", "dropped_groups", "surplus_groups", "extra_rounds", "sampled_groups")


def _alternating_rewarder(prompts, responses, policy_version=0):
    import numpy as np

    from megatron_cropi.records import RolloutGroup

    out = []
    for p, rs in zip(prompts, responses):
        live = p.source in LIVE
        rewards = np.array([float(live and j % 2 == 0) for j in range(len(rs))], dtype=np.float32)
        out.append(RolloutGroup(prompt=p, responses=tuple(rs), rewards=rewards, policy_version=policy_version))
    return out


def _trainer(g, grpo=GRPO, **kwargs):
    from megatron_cropi.testing.grpo_tiny import build_tiny_trainer, easy_prompts

    trainer = build_tiny_trainer(g, grpo, prompts=easy_prompts(2), **kwargs)
    trainer.collector.rewarder = _alternating_rewarder
    return trainer


def _replay(steps, size, max_extra_rounds):
    """The expected kept prompt ids and counts of each step, by replaying the prompt stream by hand."""
    from megatron_cropi.grpo.data import PromptStream
    from megatron_cropi.testing.grpo_tiny import easy_prompts

    stream, out = PromptStream(easy_prompts(2), seed=3), []
    for _ in range(steps):
        kept, dropped, surplus, rounds = [], 0, 0, 0
        while True:
            for p in stream.next_batch(size):
                if p.source not in LIVE:
                    dropped += 1
                elif len(kept) < size:
                    kept.append(p.prompt_id)
                else:
                    surplus += 1
            if len(kept) == size or rounds == max_extra_rounds:
                break
            rounds += 1
        out.append({"ids": kept, "kept_groups": len(kept), "dropped_groups": dropped, "surplus_groups": surplus,
                    "extra_rounds": rounds, "sampled_groups": size * (rounds + 1), "position": stream.state_dict()})
    return out


def _one_rank(tb_dir):
    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.parallel import build_parallel_groups, init_distributed

    init_distributed()
    g = build_parallel_groups(1, 1)
    out = {}
    # one dynamic step against a plain step of an identical policy on exactly the kept groups
    dynamic = _trainer(g, metrics_dir=tb_dir)
    before = assemble_global_tensors(dynamic.model, g, attr="data")
    first = dynamic.step()
    batch = dynamic.last_dynamic_batch
    plain = _trainer(g, {**GRPO, "dynamic_sampling": {"enabled": False}})
    plain_metrics = plain.train_on_rollouts(batch.groups, batch.positions)
    out["first"] = {"metrics": first, "plain_metrics": plain_metrics, "ids": list(batch.prompt_ids),
                    "group_ids": [grp.prompt_id for grp in batch.groups], "positions": list(batch.positions),
                    "variances": [float(grp.rewards.var()) for grp in batch.groups],
                    "position": dynamic.stream.state_dict(), "before": before,
                    "dynamic": assemble_global_tensors(dynamic.model, g, attr="data"),
                    "plain": assemble_global_tensors(plain.model, g, attr="data")}
    out["run"] = [first] + [dynamic.step() for _ in range(STEPS - 1)]
    out["run_ids"] = [list(dynamic.last_dynamic_batch.prompt_ids)]
    out["params"] = assemble_global_tensors(dynamic.model, g, attr="data")
    dynamic.close()
    # the cap: one extra round only
    capped = _trainer(g, {**GRPO, "dynamic_sampling": {"enabled": True, "max_extra_rounds": 1}})
    out["capped"] = (capped.step(), list(capped.last_dynamic_batch.prompt_ids), capped.stream.state_dict())
    return out


def _two_ranks(ckpt_dir):
    import torch.distributed as dist

    from megatron_cropi.checkpoint.dist_ckpt import latest_checkpoint
    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.parallel import build_parallel_groups, init_distributed

    init_distributed()
    g = build_parallel_groups(1, 1)  # DP = 2
    out = {}
    run = _trainer(g, {**GRPO, "checkpoint": {"save_interval": 2, "keep_last": 0}}, checkpoint_dir=ckpt_dir)
    metrics, kept_here = [], []
    for _ in range(4):
        metrics.append(run.step())
        kept_here.append(len(run.last_dynamic_batch.groups))
        if run.step_count == STEPS:
            out["params_at_3"] = assemble_global_tensors(run.model, g, attr="data", dst=0)
    out["metrics"], out["kept_here"] = metrics, kept_here
    out["params_at_4"] = assemble_global_tensors(run.model, g, attr="data", dst=0)
    out["position"] = run.state_dict()["data"]
    # resume from the step-2 checkpoint and run to step 4
    step2 = sorted(p for p in latest_checkpoint(ckpt_dir).parent.iterdir() if p.name.startswith("step_"))[0]
    resumed = _trainer(g)
    resumed.load(step2)
    out["resumed_from"] = (step2.name, resumed.step_count)
    out["resumed_metrics"] = [resumed.step() for _ in range(2)]
    out["resumed_params"] = assemble_global_tensors(resumed.model, g, attr="data", dst=0)
    out["resumed_position"] = resumed.state_dict()["data"]
    return out if dist.get_rank() == 0 else kept_here


def _max_err(a, b):
    assert set(a) == set(b)
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.timeout(400)
def test_dynamic_sampling_keeps_refills_caps_and_equals_plain_step_dp2_and_resume(tmp_path):
    from megatron_cropi.metrics import read_scalars

    expected = _replay(4, GRPO["prompts_per_step"], GRPO["dynamic_sampling"]["max_extra_rounds"])
    # the fixture exercises refills (extra rounds); over the run some steps also meet surplus groups
    assert expected[0]["extra_rounds"] >= 1 and expected[0]["dropped_groups"] > 0
    one = run_ranks(_one_rank, 1, args=(str(tmp_path / "tb"),), timeout_s=300)[0]

    # kept groups, counts and stream position = the hand replay
    first = one["first"]
    assert first["ids"] == expected[0]["ids"] == first["group_ids"]
    assert first["positions"] == list(range(len(first["ids"])))
    assert all(v > 0 for v in first["variances"])
    for step, (metrics, want) in enumerate(zip(one["run"], expected)):
        for key in COUNTS:
            assert metrics[key] == want[key], (step, key, metrics[key], want[key])
    assert one["run_ids"][-1] == expected[STEPS - 1]["ids"]
    assert first["position"] == expected[0]["position"]

    # the dynamic step's update = a plain step on exactly the kept groups
    assert _max_err(first["dynamic"], first["before"]) > 1e-3, "the step did not move the weights"
    assert _max_err(first["dynamic"], first["plain"]) <= 1e-7
    for key in ("pg_loss", "kl", "entropy", "response_tokens", "grad_norm", "live_groups"):
        assert first["metrics"][key] == pytest.approx(first["plain_metrics"][key], rel=1e-6, abs=1e-9), key

    # the cap: one extra round, fewer kept groups than prompts_per_step, the stream past both rounds
    capped_metrics, capped_ids, capped_position = one["capped"]
    want = _replay(1, GRPO["prompts_per_step"], 1)[0]
    assert capped_metrics["extra_rounds"] == 1 and 0 < capped_metrics["kept_groups"] < GRPO["prompts_per_step"]
    assert capped_ids == want["ids"] and capped_metrics["kept_groups"] == want["kept_groups"]
    assert capped_metrics["dropped_groups"] == want["dropped_groups"] and capped_position == want["position"]

    scalars = read_scalars(tmp_path / "tb")
    for key in COUNTS:
        assert [v for _, v in scalars[f"train/{key}"]] == [m[key] for m in one["run"]], key

    # DP = 2: the same kept groups (split unevenly over the ranks), the same parameters
    two, kept_rank1 = run_ranks(_two_ranks, 2, args=(str(tmp_path / "ckpt"),), timeout_s=360)
    assert [a + b for a, b in zip(two["kept_here"], kept_rank1)] == [e["kept_groups"] for e in expected]
    assert any(a != b for a, b in zip(two["kept_here"], kept_rank1)), "the ranks kept equal shares: vacuous"
    for step in range(STEPS):
        for key in COUNTS + ("reward",):
            assert two["metrics"][step][key] == one["run"][step][key], (step, key)
    err = _max_err(two["params_at_3"], one["params"])
    assert err <= 1e-5, f"DP=2 differs from DP=1 by {err:.3e}"

    # resumed from step 2 = uninterrupted to step 4
    assert two["resumed_from"] == ("step_00000002", 2)
    assert two["resumed_position"] == two["position"] == expected[3]["position"]
    assert _max_err(two["resumed_params"], two["params_at_4"]) <= 1e-6
    for a, b in zip(two["metrics"][2:], two["resumed_metrics"]):
        for key in COUNTS + ("reward", "kl", "pg_loss"):
            assert b[key] == pytest.approx(a[key], abs=1e-6), key
