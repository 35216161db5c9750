"""`cropi select` on a checkpoint saved at TP=2 and one saved at PP=2 (each selected in its own layout)
writes the selection it writes at TP=1, and from the run's HF export, and with ``scoring.scale_out`` at DP=2; a select killed mid-scoring
resumes without recomputing done rows and ends identical. Under the interleaved schedule (PP=2, VPP=2)
it writes the TP=1 selection too, from a TP=1 distributed checkpoint and from an HF export, and
``cropi score`` writes the TP=1 features.

One short ``cropi run`` on the tiny synthetic suite (a module fixture) makes the behaviour rollouts and a
GRPO checkpoint (TP=1); the checkpoint is re-saved in the TP=2 and PP=2 layouts (bit-identical weights,
the layout recorded in its ``meta.json``). The run's model has 2 layers, and PP×V = 4 chunks need 4: the
interleaved case scores the run's rollouts with a 4-layer policy drawn from ``(run.seed, global name)``,
saved once at TP=1 as a distributed checkpoint and as an HF directory, at TP=1 (the reference) and at
PP=2 VPP=2.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

SELECT = ["selection.ratio=0.1"]  # a budget below the prompts with a gradient: the order matters
FOUR_LAYERS = ["model.transformer.num_layers=4"]
VPP = ["parallel.pipeline_model_parallel_size=2", "model.transformer.virtual_pipeline_model_parallel_size=2"]


def _reshard(cfg_path: str, ckpt: str, out_root: str, tp: int, pp: int) -> str:
    """Load ``ckpt`` into a TP×PP layout and save it there (rank function of ``run_ranks``)."""
    from megatron_cropi.checkpoint.dist_ckpt import load_checkpoint, save_checkpoint
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.run_config import load_run_config
    from megatron_cropi.wiring import build_policy_model

    cfg = load_run_config(cfg_path, [f"parallel.tensor_model_parallel_size={tp}",
                                     f"parallel.pipeline_model_parallel_size={pp}"])
    init_distributed()
    groups = build_parallel_groups(tp, pp, seed=cfg.run.seed)
    model = build_policy_model(cfg, groups)
    meta = load_checkpoint(ckpt, model=model, groups=groups, restore_rng=False)
    return str(save_checkpoint(out_root, meta["step"], model=model, groups=groups, state=meta["state"]))


def _save_four_layer_policy(cfg_path: str, out_root: str) -> tuple[str, str]:
    """A 4-layer policy drawn from ``(run.seed, global name)`` at TP=1, saved as a distributed checkpoint
    (step 0) and as an HF directory (rank function of ``run_ranks``)."""
    from megatron_cropi.checkpoint import save_model_as_hf
    from megatron_cropi.checkpoint.dist_ckpt import save_checkpoint
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.run_config import load_run_config
    from megatron_cropi.wiring import build_policy_model

    cfg = load_run_config(cfg_path, FOUR_LAYERS)
    init_distributed()
    groups = build_parallel_groups(1, 1, seed=cfg.run.seed)
    model = build_policy_model(cfg, groups)
    ckpt = save_checkpoint(Path(out_root) / "checkpoints", 0, model=model, groups=groups)
    hf = save_model_as_hf(model, groups, cfg.model, Path(out_root) / "hf")
    return str(ckpt), str(hf)


def _cli(args, *, nproc=1, fault=None):
    from megatron_cropi.testing.cli import run_cli

    return run_cli(args, nproc=nproc, fault=fault, timeout=400)


def _selection(out: Path, *, ranking: bool = True) -> dict:
    """The selection ``cropi select`` wrote to ``out``; ``ranking``: whether it keeps a ranking file
    (not under ``scoring.scale_out``, which selects where the cosines are)."""
    import pyarrow.parquet as pq

    from megatron_cropi.selection.stored import read_selection

    sel = read_selection(out / "selections" / "stage0.json").to_dict()
    rows = pq.read_table(out / "selections" / "stage0.parquet").to_pylist()
    lines = [json.loads(x) for x in (out / "selections" / "stage0.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [x["prompt_id"] for x in lines] == sel["prompt_ids"]
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert (out / "reports" / "stage0.md").is_file() and (out / "rankings" / "stage0.json").is_file() == ranking
    return {"ids": sel["prompt_ids"], "scores": np.array(sel["scores"]), "rows": rows}


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory):
    """``(config path, run directory)`` of one short ``cropi run`` (rollouts, checkpoints, HF export)."""
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    root = tmp_path_factory.mktemp("select")
    run = root / "run"
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_curriculum_config(str(run))))
    rc, log = _cli(["run", str(cfg)])
    assert rc == 0, log[-3000:]
    return cfg, run


@pytest.mark.timeout(1500)
def test_select_same_at_tp1_tp2_pp2_and_hf_and_resumes(tmp_path, curriculum_run):
    from megatron_cropi.checkpoint.dist_ckpt import latest_checkpoint, read_checkpoint_meta
    from megatron_cropi.data.exports import verl_schema_problems
    from megatron_cropi.testing.spawn import run_ranks

    cfg, run = curriculum_run
    ckpt = latest_checkpoint(run / "checkpoints")
    resaved = {}
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2)):
        resaved[name] = Path(run_ranks(_reshard, 2, args=(str(cfg), str(ckpt), str(tmp_path / name), tp, pp),
                                       timeout_s=300)[0])
        assert read_checkpoint_meta(resaved[name])["layout"] == {"tp": tp, "pp": pp, "dp": 1}

    # TP=1, killed after its first written feature chunk, then restarted
    ref_out = tmp_path / "sel-tp1"
    rc, log = _cli(["select", str(cfg), "--checkpoint", str(ckpt), "--out", str(ref_out), *SELECT], fault="score:chunk")
    assert rc == 17, log[-3000:]
    rc, log = _cli(["select", str(cfg), "--checkpoint", str(ckpt), "--out", str(ref_out), *SELECT])
    assert rc == 0, log[-3000:]
    summary = json.loads(log.strip().splitlines()[-1])
    assert summary["scoring"]["pool"]["skipped_done"] > 0  # the first run's rows were kept
    ref = _selection(ref_out)
    assert summary["selected"] == len(ref["ids"]) == int(0.1 * summary["pool"]) > 0
    assert verl_schema_problems(ref_out / "selections" / "stage0.parquet") == []

    runs = {"tp2": (resaved["tp2"], ["parallel.tensor_model_parallel_size=2"], 2),
            "pp2": (resaved["pp2"], ["parallel.pipeline_model_parallel_size=2"], 2),
            "hf": (run / "final_hf", [], 1),  # the run's HF export: the same weights as its last checkpoint
            # scoring.scale_out at DP=2: each replica scores units into its own shard; a distributed top-m
            # selects where the cosines are (no ranking file)
            "scale_out_dp2": (ckpt, ["scoring.scale_out=true"], 2)}
    for name, (checkpoint, layout, nproc) in runs.items():
        out = tmp_path / f"sel-{name}"
        rc, log = _cli(["select", str(cfg), "--checkpoint", str(checkpoint), "--out", str(out), *SELECT, *layout],
                       nproc=nproc)
        assert rc == 0, f"{name}: {log[-3000:]}"
        got = _selection(out, ranking=name != "scale_out_dp2")
        assert got["ids"] == ref["ids"], name
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=1e-4, err_msg=name)
        strip = lambda rows: [{k: v for k, v in r.items() if k not in ("score", "extra_info")} for r in rows]  # noqa: E731
        assert strip(got["rows"]) == strip(ref["rows"]), name

    # an output directory made at another checkpoint is refused, naming both
    rc, log = _cli(["select", str(cfg), "--checkpoint", str(run / "final_hf"), "--out", str(ref_out), *SELECT])
    assert rc == 2 and "choose another --out" in log, log[-2000:]


@pytest.mark.timeout(1500)
def test_select_under_the_interleaved_schedule_pp2_vpp2_same_as_tp1(tmp_path, curriculum_run):
    """PP=2, VPP=2 (rank 0: layers 0 and 2, rank 1: layers 1 and 3) from the TP=1 distributed
    checkpoint and from the HF export: the TP=1 selection, scores within 1e-4."""
    from megatron_cropi.testing.spawn import run_ranks

    cfg, _ = curriculum_run
    ckpt, hf = run_ranks(_save_four_layer_policy, 1, args=(str(cfg), str(tmp_path / "policy4")), timeout_s=300)[0]
    ref_out = tmp_path / "sel4-tp1"
    rc, log = _cli(["select", str(cfg), "--checkpoint", ckpt, "--out", str(ref_out), *SELECT, *FOUR_LAYERS])
    assert rc == 0, log[-3000:]
    ref = _selection(ref_out)
    ranking = sorted((v for v in json.loads((ref_out / "rankings" / "stage0.json").read_text())["scores"].values()
                      if isinstance(v, float) and np.isfinite(v)), reverse=True)
    gap = ranking[len(ref["ids"]) - 1] - ranking[len(ref["ids"])]
    assert len(ref["ids"]) > 0 and gap > 1e-3, gap  # the last selected prompt is not a near-tie
    for name, checkpoint in (("dist", ckpt), ("hf", hf)):
        out = tmp_path / f"sel4-vpp-{name}"
        rc, log = _cli(["select", str(cfg), "--checkpoint", checkpoint, "--out", str(out), *SELECT, *FOUR_LAYERS,
                        *VPP], nproc=2)
        assert rc == 0, f"{name}: {log[-3000:]}"
        got = _selection(out)
        assert got["ids"] == ref["ids"], name
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=1e-4, err_msg=name)
        print(f"PP2 VPP2 from {name}: max |score - TP1| {np.abs(got['scores'] - ref['scores']).max():.2e}, "
              f"selection margin {gap:.2e}")


@pytest.mark.timeout(900)
def test_score_under_the_interleaved_schedule_pp2_vpp2_same_as_tp1(tmp_path, curriculum_run):
    """``cropi score`` at PP=2, VPP=2 from the TP=1 distributed checkpoint of a 4-layer policy writes the
    pool features ``cropi score`` writes at TP=1 (relative 1e-4 per row), the same rows excluded."""
    from megatron_cropi.influence.feature_store import FeatureStore
    from megatron_cropi.testing.spawn import run_ranks

    cfg, run = curriculum_run
    ckpt, _ = run_ranks(_save_four_layer_policy, 1, args=(str(cfg), str(tmp_path / "policy4")), timeout_s=300)[0]
    stores = {}
    for tag, layout, nproc in (("vpp-test-tp1", [], 1), ("vpp-test-pp2vpp2", VPP, 2)):
        rc, log = _cli(["score", str(cfg), "--checkpoint", ckpt, "--sets", "pool", "--tag", tag, *FOUR_LAYERS,
                        *layout], nproc=nproc)
        assert rc == 0, f"{tag}: {log[-3000:]}"
        fs = FeatureStore.load(run / "features" / tag / "pool")
        stores[tag] = (fs.matrix().astype(np.float64), fs.statuses())
    (ref, ref_status), (got, status) = stores["vpp-test-tp1"], stores["vpp-test-pp2vpp2"]
    assert np.array_equal(status, ref_status) and (ref_status == 1).sum() > 0
    live = ref_status == 1
    err = np.linalg.norm(got[live] - ref[live], axis=1) / np.linalg.norm(ref[live], axis=1)
    assert err.max() < 1e-4, err.max()
