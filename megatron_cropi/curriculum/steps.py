"""The bodies of the controller's steps; each reads and writes files under ``run.output_dir``.

Layout::

    rollouts/{pool,target-<name>}/         trajectory stores of β (once)
    features/stage{m}/{pool,target-<name>}/ feature stores at θ_m
    selections/stage{m}.json               the stage's chosen prompts
    checkpoints/step_*/                    GRPO checkpoints (model, optimizer, RNG, data position)
    metrics/eval.jsonl                     accuracy against step
    reports/stage{m}.{json,md}             per-stage report
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist

from megatron_cropi.utils.atomic import atomic_write_json

__all__ = ["behaviour_rollouts", "score_stage", "select_stage", "train_stage", "report_stage", "load_selection",
           "selected_prompts", "truncate_eval_log", "read_store_groups", "evaluate_now"]


def _bcast(obj, ctl):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _beta_identity(ctl) -> str:
    from megatron_cropi.rollout.runner import checkpoint_identity

    hf = ctl.rt.hf_dir
    return checkpoint_identity(hf) if hf else f"random-init:seed={ctl.cfg.run.seed}:{ctl.cfg.model.preset}"


def behaviour_rollouts(ctl, name: str, prompts, n: int):
    """Roll ``prompts`` out ``n`` times each with β into ``rollouts/{name}`` (resumes a partial store)."""
    from megatron_cropi.data.prompt_ids import pool_hash
    from megatron_cropi.rollout.runner import rollout_prompts
    from megatron_cropi.rollout.store import StoreHeader, TrajectoryStore

    rt, cfg = ctl.rt, ctl.cfg
    cc = cfg.curriculum
    sampling = dataclasses.replace(
        rt.sampling, n=n,
        temperature=rt.sampling.temperature if cc.behaviour_temperature is None else cc.behaviour_temperature,
        max_tokens=rt.sampling.max_tokens if cc.behaviour_max_tokens is None else cc.behaviour_max_tokens)
    store = None
    if ctl.rank0:
        header = StoreHeader.build(sampling, tokenizer=ctl.tokenizer.identity, model=_beta_identity(ctl),
                                   policy_version=0, num_prompts=len(prompts), engine=cfg.rollout.engine,
                                   pool_hash=pool_hash(p.prompt_id for p in prompts), extra={"set": name})
        store = TrajectoryStore.open_for_append(ctl.out / "rollouts" / name, header)
    return rollout_prompts(prompts, rt.engine, sampling, store=store, reward_fn=rt.reward_fn if ctl.rank0 else None,
                           tokenizer=ctl.tokenizer, batch_prompts=cfg.rollout.batch_prompts, policy_version=0,
                           groups=ctl.groups, progress=cfg.rollout.progress and ctl.rank0, desc=f"rollout {name}")


def read_store_groups(ctl, name: str):
    """All rollout groups of ``rollouts/{name}`` in prompt-id order, and the store's sampling params.

    Every rank reads the store itself (``run.output_dir`` must be on a filesystem all ranks see).
    """
    from megatron_cropi.rollout.store import TrajectoryStore

    store = TrajectoryStore.open(ctl.out / "rollouts" / name)
    if not store.complete:
        raise RuntimeError(f"{store.path} is not complete; rerun to finish the behaviour rollouts")
    return list(store.iter_groups()), store.header.sampling_params


def _projector(ctl):
    if getattr(ctl, "_projector", None) is None:
        from megatron_cropi.projection.config import build_projector

        ctl._projector = build_projector(ctl.cfg.projection)
    return ctl._projector


def _projector_id(ctl) -> str:
    """The projector's identity for feature-store headers (kind, k, keep ratio, seed, operator version)."""
    return json.dumps(_projector(ctl).describe(), sort_keys=True, default=str)


def feature_sets(ctl) -> list[str]:
    return ["pool"] + [f"target-{t}" for t in sorted(ctl.prompts.targets)]


def score_stage(ctl, m: int) -> dict:
    """Feature stores of the pool and every target set at θ_m; returns ``{set: path}``."""
    from megatron_cropi.curriculum.controller import fault_point
    from megatron_cropi.influence.feature_store import FeatureHeader, FeatureStore, hash_strings
    from megatron_cropi.influence.scorer import param_set_hash, score_pool

    cfg, rt = ctl.cfg, ctl.rt
    paths = {}
    if cfg.selection.policy != "cropi":
        return paths
    projector = _projector(ctl)
    pset = param_set_hash(rt.model, ctl.groups, cfg.scoring)
    for name in feature_sets(ctl):
        path = ctl.out / "features" / f"stage{m}" / name
        paths[name] = path
        step = f"stage{m}/score/{name}"
        if ctl._done(step):
            continue
        t0 = time.perf_counter()
        groups_list, sp = read_store_groups(ctl, name)
        header = FeatureHeader(num_rows=len(groups_list), k=projector.k, seed=cfg.projection.seed,
                               projector=_projector_id(ctl), param_set_hash=pset,
                               checkpoint_step=rt.trainer.step_count,
                               prompt_id_hash=hash_strings(g.prompt_id for g in groups_list),
                               dtype=cfg.scoring.feature_dtype)
        store = FeatureStore.open(path, header) if ctl.rank0 else None
        temperature = sp.temperature if sp.logprobs == "sampling" and sp.temperature > 0 else 1.0
        stats = score_pool(groups_list, store, model=rt.model, groups=ctl.groups, projector=projector,
                           cfg=cfg.scoring, temperature=temperature, responses_per_prompt=sp.n, pad_id=rt.pad_id,
                           progress=cfg.rollout.progress, on_chunk=lambda: fault_point("score:chunk"))
        ctl.log(f"[score] stage {m} {name}: {stats.scored} scored, {stats.excluded} zero-variance excluded, "
                f"{stats.flagged} flagged, {stats.seconds:.1f} s ({1e3 * stats.seconds_per_prompt:.1f} ms/prompt)")
        ctl.add_clock("scoring", time.perf_counter() - t0)
        ctl._mark(step, **dataclasses.asdict(stats))
    return paths


def load_selection(ctl, m: int):
    from megatron_cropi.selection.policies import Selection

    path = ctl.out / "selections" / f"stage{m}.json"
    return Selection.from_dict(json.loads(path.read_text())) if path.exists() else None


def selected_prompts(ctl, selection):
    by_id = {p.prompt_id: p for p in ctl.prompts.pool}
    missing = [i for i in selection.prompt_ids if i not in by_id]
    if missing:
        raise RuntimeError(f"selection of stage {selection.stage} names {len(missing)} prompts not in the pool "
                           f"(e.g. {missing[0]}); the pool changed since it was made")
    return [by_id[i] for i in selection.prompt_ids]


def select_stage(ctl, m: int, features: dict):
    """Choose stage ``m``'s prompts (on rank 0, shared with every rank) and write ``selections/stage{m}.json``."""
    from megatron_cropi.curriculum.controller import fault_point
    from megatron_cropi.influence.feature_store import DONE, FeatureStore
    from megatron_cropi.selection.policies import SelectionInputs, select

    step = f"stage{m}/select"
    if ctl._done(step):
        sel = load_selection(ctl, m)
        if sel is not None:
            return sel
    t0 = time.perf_counter()
    result = None
    if ctl.rank0:
        try:
            previous = set()
            for j in range(m):
                prev = load_selection(ctl, j)
                previous |= set(prev.prompt_ids) if prev else set()
            if (ctl.out / "rollouts" / "pool").exists():
                pool_groups, _ = read_store_groups(ctl, "pool")
                inp = SelectionInputs(prompt_ids=[g.prompt_id for g in pool_groups],
                                      pass_rates=np.array([g.pass_rate for g in pool_groups]),
                                      sources=[g.prompt.source for g in pool_groups], previous=previous)
            else:  # full / random need no rollouts
                pool = sorted(ctl.prompts.pool, key=lambda p: p.prompt_id)
                inp = SelectionInputs(prompt_ids=[p.prompt_id for p in pool], pass_rates=np.full(len(pool), np.nan),
                                      sources=[p.source for p in pool], previous=previous)
            if features:
                fs = FeatureStore.load(features["pool"])
                inp.features = fs.matrix()
                inp.usable = (fs.statuses() == DONE) & (np.abs(inp.features).sum(1) > 0)
                for name, path in features.items():
                    if name.startswith("target-"):
                        t = FeatureStore.load(path)
                        tf = t.matrix()
                        inp.targets[name[len("target-"):]] = (tf, (t.statuses() == DONE) & (np.abs(tf).sum(1) > 0))
            result = select(ctl.cfg.selection, inp, stage=m, seed=ctl.cfg.run.seed)
            result.summary["seconds"] = time.perf_counter() - t0
            atomic_write_json(ctl.out / "selections" / f"stage{m}.json", result.to_dict())
        except Exception as err:  # every rank must stop, not only rank 0
            result = err
    result = _bcast(result, ctl)
    if isinstance(result, Exception):
        raise result
    ctl.add_clock("selection", time.perf_counter() - t0)
    fault_point("select")
    ctl.log(f"[select] stage {m}: {len(result.prompt_ids)} prompts by {result.policy}; mix "
            f"{dict(list(result.summary['source_mix'].items())[:6])}")
    ctl._mark(step, seconds=result.summary["seconds"])
    return result


def _eval_log_path(ctl) -> Path:
    return ctl.out / "metrics" / "eval.jsonl"


def truncate_eval_log(ctl, step: int) -> None:
    """Drop evaluation records after ``step`` (a resumed run recomputes them identically)."""
    path = _eval_log_path(ctl)
    if not ctl.rank0 or not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def evaluate_now(ctl) -> dict:
    """Target accuracy (sampled and greedy) and the check set's, logged to TensorBoard and eval.jsonl."""
    from megatron_cropi.curriculum.evaluate import evaluate_accuracy
    from megatron_cropi.grpo.rollouts import RolloutCollector

    cfg, rt = ctl.cfg, ctl.rt
    ec = cfg.curriculum.eval
    step = rt.trainer.step_count
    path = _eval_log_path(ctl)
    if ctl.rank0 and path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["step"] == step:
                return rec
    t0 = time.perf_counter()
    collector = RolloutCollector(rt.engine, rt.rewarder, ctl.groups)
    seed = cfg.run.seed + 104729
    rec = {"step": step}
    res = evaluate_accuracy(collector, ctl.groups, ctl.prompts.test, rt.sampling, samples=ec.samples,
                            temperature=ec.temperature, seed=seed, max_prompts=ec.max_prompts)
    rec["target_sampled"] = res["pass_rate"]
    if ec.greedy:
        rec["target_greedy"] = evaluate_accuracy(collector, ctl.groups, ctl.prompts.test, rt.sampling, samples=1,
                                                 temperature=0.0, seed=seed, max_prompts=ec.max_prompts)["pass_rate"]
    if ec.check and ctl.prompts.check:
        chk = evaluate_accuracy(collector, ctl.groups, ctl.prompts.check, rt.sampling, samples=1, temperature=0.0,
                                seed=seed, max_prompts=ec.max_prompts)
        rec["check_greedy"] = chk["pass_rate"]
        rec["check_by_source"] = chk["by_source"]
    rec["seconds"] = time.perf_counter() - t0
    rec["clock_seconds"] = ctl.clock_seconds
    ctl.metrics.log(step, {k: v for k, v in rec.items() if isinstance(v, float)}, prefix="eval")
    if ctl.rank0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    ctl.log(f"[eval] step {step}: target sampled {rec['target_sampled']:.3f}"
            + (f" greedy {rec['target_greedy']:.3f}" if "target_greedy" in rec else "")
            + (f", check {rec['check_greedy']:.3f}" if "check_greedy" in rec else ""))
    return rec


def train_stage(ctl, m: int, selection) -> None:
    """GRPO steps ``m·T .. (m+1)·T`` on the selection; checkpoint at the end of the stage."""
    from megatron_cropi.curriculum.controller import fault_point

    cfg, trainer = ctl.cfg, ctl.rt.trainer
    T = cfg.curriculum.steps_per_stage
    start, end = m * T, (m + 1) * T
    if trainer.step_count == start:
        trainer.set_prompts(selected_prompts(ctl, selection))
    elif not start < trainer.step_count <= end:
        raise RuntimeError(f"stage {m} covers steps {start}..{end}, but the policy is at step {trainer.step_count}")
    if trainer.step_count == 0:
        evaluate_now(ctl)
    t0 = time.perf_counter()
    while trainer.step_count < end:
        t_step = time.perf_counter()
        metrics = trainer.step()
        ctl.add_clock("training", time.perf_counter() - t_step)
        fault_point("train:step")
        if ctl.rank0:
            ctl.state.update(train_step=trainer.step_count, stage=m)
        if trainer.step_count % cfg.curriculum.eval.every == 0 or trainer.step_count == cfg.curriculum.total_steps:
            evaluate_now(ctl)
        if trainer.step_count % 10 == 0:
            ctl.log(f"[train] step {trainer.step_count}: reward {metrics.get('reward', float('nan')):.3f}")
    from megatron_cropi.checkpoint.dist_ckpt import latest_checkpoint, read_checkpoint_meta

    last = latest_checkpoint(ctl.out / "checkpoints")
    if last is None or int(read_checkpoint_meta(last)["step"]) != trainer.step_count:
        last = trainer.save()
    ctl.log(f"[train] stage {m} done at step {trainer.step_count} ({time.perf_counter() - t0:.1f} s) -> {last.name}")


def report_stage(ctl, m: int, selection, features: dict) -> None:
    from megatron_cropi.curriculum.report import write_stage_report

    write_stage_report(ctl, m, selection, features)
