"""`cropi select` on a checkpoint saved at TP=2 and one saved at PP=2 (each selected in its own layout)
writes the selection it writes at TP=1, and from the run's HF export, and with ``scoring.scale_out`` at DP=2; a select killed mid-scoring
resumes without recomputing done rows and ends identical.

One short ``cropi run`` on the tiny synthetic suite makes the behaviour rollouts and a GRPO checkpoint
(TP=1); the checkpoint is re-saved in the TP=2 and PP=2 layouts (bit-identical weights, the layout
recorded in its ``meta.json``).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

SELECT = ["selection.ratio=0.1"]  # a budget below the prompts with a gradient: the order matters


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


def _cli(args, *, nproc=1, fault=None):
    from megatron_cropi.testing.cli import run_cli

    return run_cli(args, nproc=nproc, fault=fault, timeout=400)


def _selection(out: Path) -> dict:
    import pyarrow.parquet as pq

    sel = json.loads((out / "selections" / "stage0.json").read_text())
    rows = pq.read_table(out / "selections" / "stage0.parquet").to_pylist()
    lines = [json.loads(x) for x in (out / "selections" / "stage0.jsonl").read_text().splitlines()]
    assert [r["prompt_id"] for r in rows] == [x["prompt_id"] for x in lines] == sel["prompt_ids"]
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    assert (out / "reports" / "stage0.md").is_file() and (out / "rankings" / "stage0.json").is_file()
    return {"ids": sel["prompt_ids"], "scores": np.array(sel["scores"]), "rows": rows}


@pytest.mark.timeout(1500)
def test_select_same_at_tp1_tp2_pp2_and_hf_and_resumes(tmp_path):
    from megatron_cropi.checkpoint.dist_ckpt import latest_checkpoint, read_checkpoint_meta
    from megatron_cropi.data.exports import verl_schema_problems
    from megatron_cropi.testing.spawn import run_ranks
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    run = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_curriculum_config(str(run))))
    rc, log = _cli(["run", str(cfg)])
    assert rc == 0, log[-3000:]
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
            # scoring.scale_out at DP=2: each replica scores units into its own shard; rank 0 meets on cosines
            "scale_out_dp2": (ckpt, ["scoring.scale_out=true"], 2)}
    for name, (checkpoint, layout, nproc) in runs.items():
        out = tmp_path / f"sel-{name}"
        rc, log = _cli(["select", str(cfg), "--checkpoint", str(checkpoint), "--out", str(out), *SELECT, *layout],
                       nproc=nproc)
        assert rc == 0, f"{name}: {log[-3000:]}"
        got = _selection(out)
        assert got["ids"] == ref["ids"], name
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=1e-4, err_msg=name)
        strip = lambda rows: [{k: v for k, v in r.items() if k not in ("score", "extra_info")} for r in rows]  # noqa: E731
        assert strip(got["rows"]) == strip(ref["rows"]), name

    # an output directory made at another checkpoint is refused, naming both
    rc, log = _cli(["select", str(cfg), "--checkpoint", str(run / "final_hf"), "--out", str(ref_out), *SELECT])
    assert rc == 2 and "choose another --out" in log, log[-2000:]
