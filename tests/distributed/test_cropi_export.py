"""`cropi export RUN_DIR --step N`: a run's GRPO checkpoint as an HF directory that transformers reads.

A tiny curriculum (1 stage, 3 GRPO steps, a checkpoint every 2 steps) runs once at TP = 1. Its step-2
checkpoint is exported under torchrun at TP = 2 (the checkpoint resharded on load): transformers' logits
of the export equal the Megatron model's logits at that checkpoint (loaded at TP = 1) to 1e-4. The last
step's export holds exactly ``final_hf``'s tensors and config. Bad steps and existing outputs are
errors that name them. Three launches of the command in all.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

STEPS, SEQ = 3, 10


def _megatron_logits(run_dir: str, step: int, ids):
    """Logits ``[B, S, V]`` of the run's policy at checkpoint ``step``, loaded at TP = PP = 1."""
    from megatron_cropi.checkpoint.dist_ckpt import load_checkpoint
    from megatron_cropi.commands.export import checkpoint_of_step, stored_run_config
    from megatron_cropi.model.provider import build_gpt_model
    from megatron_cropi.model.schedule import causal_attention_mask
    from megatron_cropi.parallel import build_parallel_groups, init_distributed

    init_distributed()
    cfg = stored_run_config(run_dir)
    groups = build_parallel_groups(1, 1, seed=cfg.run.seed)
    model = build_gpt_model(cfg.model, groups)
    load_checkpoint(checkpoint_of_step(run_dir, step), model=model, groups=groups, restore_rng=False)
    model.eval()
    pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=pos, attention_mask=causal_attention_mask(ids.shape[1], groups.device)
                     ).float()


def _cropi(args, nproc=1):
    from megatron_cropi.testing.cli import run_cli

    return run_cli(args, nproc=nproc, timeout=400)


@pytest.mark.timeout(900)
def test_export_equals_the_checkpoint_and_final_hf(tmp_path, capsys):
    from safetensors.torch import load_file

    from megatron_cropi.testing.hf_tiny import hf_logits
    from megatron_cropi.testing.spawn import run_ranks
    from megatron_cropi.testing.tiny import tiny_curriculum_config

    run = tmp_path / "run"
    cfg = tiny_curriculum_config(str(run), **{"curriculum.stages": 1, "curriculum.steps_per_stage": STEPS,
                                              "grpo.checkpoint.save_interval": 2})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rc, log = _cropi(["run", str(path)])
    assert rc == 0, log[-4000:]
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002", f"step_{STEPS:08d}"]

    # step 2, saved at TP=1, exported at TP=2 (resharded on load)
    rc, log = _cropi(["export", str(run), "--step", "2", "--tp", "2"], nproc=2)
    assert rc == 0, log[-4000:]
    result = json.loads(log.strip().splitlines()[-1])
    export = Path(result["out"])
    assert export == run / "hf" / "step_2" and result["layout"] == {"tp": 2, "pp": 1, "dp": 1}
    assert not list(export.parent.glob(".*tmp*"))  # written atomically: no temporary directory left
    vocab = json.loads((export / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(0))
    ref = run_ranks(_megatron_logits, 1, args=(str(run), 2, ids))[0]
    got = hf_logits(export, ids)
    err = (got - ref).abs().max().item()
    assert err <= 1e-4, f"max |HF export - Megatron| logits at step 2 = {err:.2e}"

    # the last step's export is the run's final_hf; a second export to the same place is refused
    rc, log = _cropi(["export", str(run), "--step", str(STEPS), "--out", str(tmp_path / "last")])
    assert rc == 0, log[-4000:]
    final, last = load_file(str(run / "final_hf" / "model.safetensors")), load_file(str(tmp_path / "last" /
                                                                                       "model.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert json.loads((run / "final_hf" / "config.json").read_text()) == \
        json.loads((tmp_path / "last" / "config.json").read_text())
    assert not torch.equal(load_file(str(export / "model.safetensors"))["model.embed_tokens.weight"],
                           last["model.embed_tokens.weight"])  # step 2 and step 3 differ: the step was honoured

    from megatron_cropi.cli import main

    capsys.readouterr()
    assert main(["export", str(run), "--step", "1"]) == 2
    assert "--step 1: no complete checkpoint" in (err := capsys.readouterr().err) and f"kept: 2, {STEPS}" in err
    assert main(["export", str(run), "--step", str(STEPS), "--out", str(tmp_path / "last")]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
