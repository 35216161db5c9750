"""``cropi select CONFIG --checkpoint CKPT``: one CROPI selection at a checkpoint, as files another
trainer reads.

    cropi select CONFIG --checkpoint RUN/checkpoints/step_00000050 [--out DIR] [--stage M]
    cropi select CONFIG --checkpoint /models/my-policy-hf                # an HF directory
    torchrun --nproc-per-node 4 -m megatron_cropi.cli select CONFIG --checkpoint CKPT parallel.tensor_model_parallel_size=2
    torchrun --nproc-per-node 2 -m megatron_cropi.cli select CONFIG --checkpoint CKPT \
        parallel.pipeline_model_parallel_size=2 model.transformer.virtual_pipeline_model_parallel_size=2

The policy is loaded as ``cropi score --checkpoint`` loads it (a GRPO checkpoint saved in any TP/PP
layout, or an HF directory) into this launch's layout, the interleaved schedule's V chunks per stage
included (``model.transformer.virtual_pipeline_model_parallel_size`` at PP > 1: the layout of a
trainer on Megatron-LM's interleaved schedule). It scores the stored behaviour rollouts of the
pool and the target sets, ``{run.output_dir}/rollouts/{pool,target-<name>}`` (written by ``cropi run``;
``cropi rollout --split val`` writes ``rollouts/val``, used as the target set when there is one), and
selects the stage's prompts with the run's ``selection`` config. Everything goes to ``DIR`` (default
``{run.output_dir}/select/<step_N | hf-<name>>``), laid out like a run directory::

    inputs.json                     the checkpoint these files were made at (a DIR made at another is refused)
    features/stage{M}/<set>/        feature stores (a killed select resumes them at the first pending row)
    selections/stage{M}.json        the selection: prompt ids, store rows, scores, summary (under
                                    ``scoring.scale_out`` a head and ``stage{M}.parts/``: selection/stored.py)
    selections/stage{M}.parquet     verl's RL dataset format (data/exports.py), best first
    selections/stage{M}.jsonl       slime's (``prompt``/``label``), best first
    rankings/stage{M}.json          every pool prompt's influence score (not with scoring.scale_out)
    reports/stage{M}.{json,md}      the stage report

Every file is written atomically by global rank 0; a rerun recomputes only missing feature rows and
rewrites the rest identically (the selection is a function of the features and ``run.seed``).
``--stage M`` numbers the selection (its random tie-breaks, ``selection.exclude_previous`` against the
stages before it in the same ``DIR``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from megatron_cropi.commands.config_args import load_config
from megatron_cropi.commands.score import load_policy_scorer
from megatron_cropi.curriculum import steps
from megatron_cropi.curriculum.exports import export_selection
from megatron_cropi.curriculum.faults import fault_point
from megatron_cropi.curriculum.report import write_stage_report
from megatron_cropi.layout import RunLayout
from megatron_cropi.utils.atomic import atomic_write_json
from megatron_cropi.utils.rank_zero import on_rank0
from megatron_cropi.wiring import RunInputError, checkpoint_identity, setup_run

__all__ = ["cmd_select", "select_at_checkpoint", "score_at_checkpoint", "behaviour_stores", "checkpoint_tag",
           "claim_output"]


def checkpoint_tag(checkpoint: str | Path) -> str:
    """``step_N`` for a GRPO checkpoint directory, ``hf-<name>`` for an HF one: the default output name."""
    path = Path(checkpoint)
    if (path / "meta.json").is_file():
        return path.name
    if (path / "config.json").is_file():
        return f"hf-{path.resolve().name}"
    raise RunInputError(f"--checkpoint {checkpoint}: neither a GRPO checkpoint (meta.json) nor an HF directory "
                        "(config.json)")


def _identity(checkpoint: str | Path) -> str:
    """What the checkpoint's weights are: the HF files' digest, or a GRPO checkpoint's ``meta.json`` digest."""
    path = Path(checkpoint)
    if (path / "meta.json").is_file():
        return f"dist:{path.name}:{hashlib.blake2b((path / 'meta.json').read_bytes(), digest_size=12).hexdigest()}"
    return checkpoint_identity(path)


def claim_output(out: Path, checkpoint: str | Path) -> None:
    """Record the checkpoint in ``out/inputs.json``, or refuse an ``out`` made at another one (its
    feature stores would be resumed with the wrong policy's rows)."""
    record = {"checkpoint": str(Path(checkpoint).resolve()), "identity": _identity(checkpoint)}
    path = out / "inputs.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("identity") != record["identity"]:
            raise RunInputError(f"{out} holds a selection made at {old.get('checkpoint')} ({old.get('identity')}), "
                                f"not at {record['checkpoint']} ({record['identity']}); choose another --out")
        return
    atomic_write_json(path, record)


def behaviour_stores(cfg, layout: RunLayout, target_names) -> dict[str, Path]:
    """``{set: trajectory store}`` of the pool, each target set and (``selection.guard.source: check``)
    the guard set, under ``{run.output_dir}/rollouts``.

    Raises:
        RunInputError: a store is missing (naming it and the command that writes it).
    """
    targets = sorted(target_names)
    names = steps.feature_set_names(targets, guard=cfg.selection.guard.source == "check")
    stores = {name: layout.rollouts(name) for name in names}
    if len(targets) == 1 and not stores[f"target-{targets[0]}"].exists() and layout.rollouts("val").exists():
        stores[f"target-{targets[0]}"] = layout.rollouts("val")  # cropi rollout --split val
    missing = [f"{name} ({path})" for name, path in stores.items() if not (path / "manifest.json").exists()]
    if missing:
        raise RunInputError(f"no behaviour rollouts for {', '.join(missing)}: run `cropi run` (or `cropi rollout "
                            "--split pool` and `--split val` for a single target set) with this config first")
    return stores


def score_at_checkpoint(cfg, checkpoint, *, groups, tokenizer, stores: dict[str, Path], out: RunLayout, stage: int,
                        fault=None) -> tuple[dict[str, Path], dict[str, dict]]:
    """Score every store at ``checkpoint`` into ``out``'s feature stores of ``stage`` (resuming them).

    Returns ``({set: feature store}, {"stage{M}/score/<set>": ScoreStats as dict})``, the same on every rank.
    """
    scorer = load_policy_scorer(cfg, groups, tokenizer, str(checkpoint))
    features, info = {}, {}
    for name, store in stores.items():
        features[name] = out.features(stage, name)
        # the pool under scoring.scale_out: shards per replica, select_stage meets on cosines
        stats = steps.score_set(store, features[name], scorer, sharded=name == "pool" and cfg.scoring.scale_out,
                                on_unit=fault)
        info[f"stage{stage}/score/{name}"] = dataclasses.asdict(stats)
    return features, info


def select_at_checkpoint(cfg, checkpoint: str | Path, *, out: str | Path | None = None, stage: int = 0,
                         fault=None) -> dict:
    """Score the pool at ``checkpoint``, select, and write the files listed in the module docstring.

    Returns a summary (paths, counts, policy), the same on every rank.
    """
    run = RunLayout(cfg.run.output_dir)
    target = RunLayout(out or run.root / "select" / checkpoint_tag(checkpoint))
    groups, prompts, tokenizer = setup_run(cfg)
    stores = behaviour_stores(cfg, run, prompts.targets) if cfg.selection.policy == "cropi" else {
        "pool": run.rollouts("pool")}
    on_rank0(lambda: claim_output(target.root, checkpoint))
    features, info = {}, {}
    if cfg.selection.policy == "cropi":
        features, info = score_at_checkpoint(cfg, checkpoint, groups=groups, tokenizer=tokenizer, stores=stores,
                                             out=target, stage=stage, fault=fault)
    selection = steps.select_stage(stage, layout=target, pool=prompts.pool, cfg=cfg.selection, seed=cfg.run.seed,
                                   features=features, pool_rollouts=stores["pool"])

    def publish() -> dict:
        parquet, jsonl = export_selection(cfg, target, stage, prompts.pool, selection)
        previous = steps.read_selection(target.selection(stage - 1)) if stage > 0 else None
        write_stage_report(stage, selection, previous, step_info=info,
                           steps_per_stage=cfg.curriculum.steps_per_stage, layout=target)
        return {"out": str(target.root), "checkpoint": str(checkpoint), "stage": stage, "policy": selection.policy,
                "selected": len(selection.prompt_ids), "pool": len(prompts.pool),
                "selection": str(target.selection(stage)), "parquet": str(parquet), "jsonl": str(jsonl),
                "report": str(target.stage_report(stage, "md")),
                "scoring": {k.rsplit("/", 1)[-1]: {f: v[f] for f in ("scored", "excluded", "flagged", "skipped_done")
                                                   if f in v} for k, v in info.items()}}

    return on_rank0(publish)


def cmd_select(args) -> int:
    """The ``cropi select`` subcommand: prints the summary as JSON on global rank 0."""
    import torch.distributed as dist

    cfg = load_config(args)
    summary = select_at_checkpoint(cfg, args.checkpoint, out=args.out, stage=args.stage,
                                   fault=lambda: fault_point("score:chunk"))
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(summary))
    return 0
