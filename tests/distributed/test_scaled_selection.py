"""CROPI selection of a sharded pool store made where the cosines are (curriculum/scaled_selection.py), gloo.

* The law: :func:`distributed_top_m` and :func:`distributed_quantiles` over 2 and 4 ranks, rows dealt
  at random and scores with many ties, pick what a stable sort of the whole array picks.
* The pipeline: a pool scored into a sharded store at DP = 2 and DP = 4 is selected by
  :func:`~megatron_cropi.curriculum.steps.select_stage` (one target, two targets fused by max, a
  check-set guard dropping and demoting, a budget above the prompts with a gradient). The oracle is
  the plain path: the pool scored into one ``[N, k]`` store at DP = 1 and
  :func:`~megatron_cropi.selection.policies.select` on its features. Same prompts, same order, same
  summary (keys in order); no ranking file is kept; the selection is on disk as a head and one part per
  rank (no pick in the head), and reads back the same. Reciprocal-rank fusion of two targets is declined:
  the cosines meet on rank 0, with the same result, in one file.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_cropi.testing.spawn import run_ranks
from test_scale_out_scoring import N_POOL, N_TARGET, _groups, _write_store  # the same tiny stores

CONFIGS = {
    "one_target": {"ratio": 0.25, "targets": ["t"]},
    "max_of_two": {"ratio": 0.25, "fusion": "max", "targets": ["t", "u"]},
    "guard_drop": {"ratio": 0.25, "targets": ["t"], "guard": {"source": "check", "threshold": 0.0}},
    "guard_demote": {"ratio": 0.5, "targets": ["t"], "guard": {"source": "check", "mode": "demote", "threshold": 0.05}},
    "shortfall": {"ratio": 0.95, "targets": ["t"]},
    # declined: reciprocal rank ranks each target's own top m, so the cosines meet on rank 0 (a ranking is kept)
    "reciprocal_rank_of_two": {"ratio": 0.25, "fusion": "reciprocal_rank", "targets": ["t", "u"]},
}
DECLINED = {"reciprocal_rank_of_two"}


def _law_worker(seed: int):
    import torch.distributed as dist

    from megatron_cropi.parallel import init_distributed
    from megatron_cropi.selection.distributed import distributed_quantiles, distributed_top_m

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for trial in range(6):
        rng = np.random.default_rng([seed, trial])
        n = int(rng.integers(1, 400))
        scores = np.round(rng.normal(size=n) * (2 if trial % 2 else 100)) / 2  # ties at every trial
        scores[rng.random(n) < 0.3] = -np.inf
        mine = rng.permutation(n)[rank::world]  # the same deal on every rank
        m = int(rng.integers(1, n + 5))
        picked = distributed_top_m(scores[mine], mine, m)
        out.append((scores, m, mine[picked].tolist(), distributed_quantiles(scores[mine], (0.0, 0.5, 0.9, 1.0))))
    dist.destroy_process_group()
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_top_m_and_quantiles_over_ranks(world):
    from megatron_cropi.selection.scores import top_m

    results = run_ranks(_law_worker, world, args=(world,), timeout_s=300)
    for trial, (scores, m, _, quantiles) in enumerate(results[0]):
        picked = sorted(p for r in results for p in r[trial][2])
        assert picked == sorted(top_m(scores, m).tolist()), (world, trial)
        finite = scores[np.isfinite(scores)]
        expect = [float(np.quantile(finite, q)) for q in (0.0, 0.5, 0.9, 1.0)] if finite.size else None
        assert quantiles == expect and all(r[trial][3] == expect for r in results)


def _selection_config(spec):
    from megatron_cropi.config.loader import from_dict
    from megatron_cropi.selection.policies import SelectionConfig

    return from_dict(SelectionConfig, {"policy": "cropi", **{k: v for k, v in spec.items() if k != "targets"}})


def _features(tmp: Path, pool_name: str, spec) -> dict:
    out = {"pool": tmp / pool_name, **{f"target-{t}": tmp / f"features_{t}" for t in spec["targets"]}}
    if "guard" in spec:
        out["guard"] = tmp / "features_g"
    return out


def _pipeline_worker(tmp):
    from megatron_cropi.curriculum.steps import select_stage, selection_inputs
    from megatron_cropi.influence.scale_out import score_store_sharded
    from megatron_cropi.influence.scorer import ScoringConfig
    from megatron_cropi.influence.stores import PolicyScorer, score_store
    from megatron_cropi.layout import RunLayout
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed
    from megatron_cropi.projection.config import build_projector
    from megatron_cropi.selection.policies import select
    from megatron_cropi.selection.stored import read_selection
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    tmp = Path(tmp)
    init_distributed()
    groups = build_parallel_groups(1, 1)
    model = build_tiny_model(tiny_model_config(), groups, seed=6)
    cfg = ScoringConfig(prompts_per_microbatch=2, microbatches_per_call=1, scale_out=True)
    scorer = PolicyScorer(model, groups, build_projector(kind="sjlt", k=64, seed=1), cfg, projection_seed=1,
                          checkpoint_step=0, pad_id=0)
    for name in ("t", "u", "g"):
        score_store(tmp / f"target_{name}", tmp / f"features_{name}", scorer)
    world = groups.dp_size
    if world == 1:
        score_store(tmp / "pool", tmp / "classic", scorer)
    score_store_sharded(tmp / "pool", tmp / f"sharded{world}", scorer)
    out = {}
    for label, spec in CONFIGS.items():
        sel_cfg = _selection_config(spec)
        layout = RunLayout(tmp / f"run{world}-{label}")
        got = select_stage(0, layout=layout, pool=[], cfg=sel_cfg, seed=3, features=_features(tmp, f"sharded{world}", spec),
                           pool_rollouts=tmp / "pool")
        head = json.loads(layout.selection(0).read_text())
        out[label] = {"got": got.to_dict(), "ranking_kept": layout.ranking(0).exists(), "head": head,
                      "read_back": read_selection(layout.selection(0)).to_dict()}
        if world == 1 and groups.rank == 0:
            inputs = selection_inputs([], pool_rollouts=tmp / "pool", features=_features(tmp, "classic", spec),
                                      previous=set())
            out[label]["oracle"] = select(sel_cfg, inputs, stage=0, seed=3).to_dict()
    # a guard every prompt conflicts with: the scaled path declines and select's error is raised on every rank
    spec = {"ratio": 0.25, "targets": ["t"], "guard": {"source": "check", "threshold": 1.0}}
    try:
        select_stage(0, layout=RunLayout(tmp / f"run{world}-none"), pool=[], cfg=_selection_config(spec), seed=3,
                     features=_features(tmp, f"sharded{world}", spec), pool_rollouts=tmp / "pool")
    except Exception as err:  # noqa: BLE001 - the message is checked
        out["guard_keeps_nothing"] = f"{type(err).__name__}: {err}"
    destroy_parallel_groups()
    return out


@pytest.mark.timeout(900)
def test_scaled_out_selection_equals_the_plain_selection_at_dp_1_2_4(tmp_path):
    from megatron_cropi.testing.tiny import tiny_model_config

    vocab = tiny_model_config().vocab_size
    _write_store(tmp_path / "pool", _groups(N_POOL, 1, vocab))
    for name, seed in (("t", 2), ("u", 3), ("g", 4)):
        _write_store(tmp_path / f"target_{name}", _groups(N_TARGET, seed, vocab))
    ref = run_ranks(_pipeline_worker, 1, args=(str(tmp_path),), timeout_s=400)[0]
    runs = {1: ref, 2: run_ranks(_pipeline_worker, 2, args=(str(tmp_path),), timeout_s=400),
            4: run_ranks(_pipeline_worker, 4, args=(str(tmp_path),), timeout_s=600)}
    runs[2], runs[4] = runs[2][0], runs[4][0]
    for label in CONFIGS:
        oracle = ref[label]["oracle"]
        assert oracle["policy"] == "cropi" and len(oracle["prompt_ids"]) > 0, label
        for world, result in runs.items():
            got, where = result[label]["got"], f"{label} at DP={world}"
            assert result[label]["ranking_kept"] == (label in DECLINED), where
            # made where scored: a head and one part per rank, no picks in the head; read back the same
            head = result[label]["head"]
            assert head.get("parts") == (None if label in DECLINED else world) and ("rows" in head) == (label in DECLINED), where
            read_back = result[label]["read_back"]
            assert read_back["prompt_ids"] == got["prompt_ids"] and read_back["scores"] == got["scores"], where
            assert read_back["summary"] == json.loads(json.dumps(got["summary"])), where  # as JSON keeps it
            assert got["prompt_ids"] == oracle["prompt_ids"] and got["rows"] == oracle["rows"], where
            np.testing.assert_allclose(got["scores"], oracle["scores"], rtol=1e-5, err_msg=where)
            summary, expect = dict(got["summary"]), dict(oracle["summary"])
            summary.pop("seconds")
            np.testing.assert_allclose(list(summary.pop("cosine_quantiles").values()),
                                       list(expect.pop("cosine_quantiles").values()), rtol=1e-5, err_msg=where)
            assert list(summary.items()) == list(expect.items()), where  # the same keys in the same order
    for world, result in runs.items():
        assert "SelectionError" in result["guard_keeps_nothing"] and "nothing selected" in result["guard_keeps_nothing"]
    # the cases exercise what they name
    assert ref["guard_drop"]["oracle"]["summary"]["guard"]["dropped"] > 0
    assert ref["guard_demote"]["oracle"]["summary"]["guard"]["demoted_selected"] > 0
    assert "shortfall" in ref["shortfall"]["oracle"]["summary"]
