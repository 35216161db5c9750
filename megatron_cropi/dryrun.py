"""``cropi run --dry-run``: check config, layout, paths and a per-GPU memory estimate without GPUs.

Nothing is created, no process group is started and no GPU is needed, so it runs on a login node or
in CI for configs meant for 8×H100 nodes. It checks:

* **layout**: the world size splits into TP×PP×DP, the model into TP and PP; vLLM's tensor
  parallelism fits a node and the GPUs of one DP replica (``cropi run`` builds one engine per DP
  replica, on the replica's first rank); ``grpo.prompts_per_step`` splits over DP and each rank's
  share into whole ``micro_batch_prompts`` micro-batches; the scoring mode suits the layer spec.
* **paths**: ``run.output_dir`` is writable; every data file exists, is readable and has the fields
  its format reads; tokenizer directories hold tokenizer files; ``rollout.checkpoint`` is an HF
  directory whose ``config.json`` describes the configured model (weights are not read).
* **memory**: :func:`megatron_cropi.memory.estimate_memory` per pipeline stage against
  ``gpu_memory_gib``; the vLLM engine inside its share (``rollout.vllm.gpu_memory_utilization ×
  gpu_memory_gib``): its weights over its own TP, workspace, CUDA graphs and a KV cache of at least
  ``rollout.batch_prompts × rollout.n`` full-length sequences (:func:`megatron_cropi.memory.engine_memory`);
  vLLM's TP against the model's attention heads; the feature stores' size on disk.
* **time and disk** (estimates, never a failure): :mod:`megatron_cropi.cost` prices a stage (scoring +
  GRPO steps), the behaviour rollouts and the run's total on H100s, and what the run leaves on disk
  (trajectory stores, feature stores, checkpoints, HF exports); ``estimate.text`` says it in words with
  its assumptions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_cropi.run_config import RunConfig
from megatron_cropi.cost import estimate_run_disk, estimate_run_time, shape_from_config
from megatron_cropi.memory import GIB, estimate_memory, feature_store_bytes, sequence_length
from megatron_cropi.parallel import LaunchError, check_layout

__all__ = ["DryRunError", "dry_run", "run_estimate", "engine_budget_problems", "check_data_file", "check_tokenizer_dir", "check_hf_checkpoint"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class DryRunError(ValueError):
    """The run as configured cannot start; the message lists every problem found."""


def _writable_dir(path: Path) -> tuple[bool, str]:
    """Whether ``path`` exists as a writable directory or could be created (nearest ancestor writable)."""
    p = path.resolve()
    if p.exists():
        if not p.is_dir():
            return False, f"{path} exists and is not a directory"
        return os.access(p, os.W_OK), f"{path} is not writable"
    for parent in p.parents:
        if parent.exists():
            ok = parent.is_dir() and os.access(parent, os.W_OK)
            return ok, f"{path} cannot be created: {parent} is not a writable directory"
    return False, f"{path} has no existing ancestor"


def check_data_file(key: str, spec) -> tuple[int, list[str]]:
    """``(rows, problems)`` of one :class:`~megatron_cropi.data.config.DatasetFile` under config key ``key``.

    Reads only the parquet footer (row count, column names) or the lines of a JSONL file (the first
    row's keys); the prompt and answer fields are checked at their top-level name.
    """
    path = Path(spec.path)
    if not path.is_file():
        return 0, [f"{key}.path: {path} does not exist or is not a file"]
    if not os.access(path, os.R_OK):
        return 0, [f"{key}.path: {path} is not readable"]
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path)
            rows, columns = meta.metadata.num_rows, set(meta.schema_arrow.names)
        else:
            rows, columns = 0, None
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        continue
                    if columns is None:
                        first = json.loads(line)
                        columns = set(first) if isinstance(first, dict) else set()
                    rows += 1
            columns = columns or set()
    except Exception as err:  # noqa: BLE001 - any unreadable file is reported by name
        return 0, [f"{key}.path: {path} cannot be read: {type(err).__name__}: {err}"]
    prompt_field, answer_field, _ = spec.fields
    problems = [f"{key}: {path} has no field {field!r} (columns: {', '.join(sorted(columns)) or 'none'}); "
                f"set {key}.{which}_field or the right format"
                for which, field in (("prompt", prompt_field), ("answer", answer_field))
                if field.split(".")[0] not in columns]
    return min(rows, spec.limit) if spec.limit else rows, problems


def check_tokenizer_dir(key: str, path: str) -> list[str]:
    """Problems of a Hugging Face tokenizer directory (exists, holds a tokenizer file)."""
    p = Path(path)
    if not p.is_dir():
        return [f"{key}: tokenizer directory {p} does not exist"]
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        return [f"{key}: {p} holds no tokenizer file (expected one of {', '.join(TOKENIZER_FILES)})"]
    return []


def check_hf_checkpoint(key: str, path: str, model_cfg) -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` of an HF checkpoint directory against the configured model.

    The architecture and every size in ``config.json`` must equal ``model``'s (through
    :func:`megatron_cropi.checkpoint.model_config_from_hf`); missing weight files are only a warning
    (a dry run does not read them).
    """
    from megatron_cropi.checkpoint import GPTDimensions, HFCheckpointError, model_config_from_hf

    p = Path(path)
    if not p.is_dir():
        return [f"{key}: HF checkpoint directory {p} does not exist"], []
    if not (p / "config.json").is_file():
        return [f"{key}: {p} has no config.json (not an HF checkpoint directory)"], []
    try:
        theirs = GPTDimensions.from_model_config(model_config_from_hf(p, params_dtype=model_cfg.params_dtype))
        ours = GPTDimensions.from_model_config(model_cfg)
    except (HFCheckpointError, ValueError, json.JSONDecodeError) as err:
        return [f"{key}: {err}"], []
    diffs = ours.differences(theirs)
    problems = [f"{key}: {p}/config.json does not match the model (model vs checkpoint): " + "; ".join(diffs)] \
        if diffs else []
    warnings = [] if any(p.glob("*.safetensors")) else [f"{key}: {p} has no *.safetensors weights yet"]
    return problems, warnings


def _layout_problems(cfg: RunConfig, dp: int, gpus_per_node: int, world_size: int) -> tuple[list[str], list[str]]:
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    problems, warnings = [], []
    if world_size > gpus_per_node and world_size % gpus_per_node:
        problems.append(f"world size {world_size} is not a whole number of nodes of {gpus_per_node} GPUs")
    if tp > gpus_per_node:
        warnings.append(f"parallel.tensor_model_parallel_size={tp} spans more than one node of {gpus_per_node} "
                        "GPUs: TP all-reduces then cross the inter-node network")
    if cfg.rollout.engine == "vllm":
        vtp = cfg.rollout.vllm.tensor_parallel_size
        if vtp > gpus_per_node:
            problems.append(f"rollout.vllm.tensor_parallel_size={vtp} exceeds the {gpus_per_node} GPUs of a node "
                            "(an in-process vLLM engine lives on one node)")
        heads, groups = cfg.model.transformer["num_attention_heads"], cfg.model.num_query_groups
        if heads % vtp or (groups % vtp and vtp % groups):
            problems.append(f"rollout.vllm.tensor_parallel_size={vtp} must divide the model's {heads} attention "
                            f"heads, and divide or be a multiple of its {groups} KV heads (vLLM shards them)")
        if (tp * pp) % vtp:
            problems.append(f"rollout.vllm.tensor_parallel_size={vtp} must divide the {tp * pp} GPUs (TP×PP) of a "
                            "data-parallel replica: cropi run builds one engine per replica, on its GPUs")
        replicas_per_node = max(1, min(world_size, gpus_per_node) // (tp * pp))
        if replicas_per_node > 1:
            warnings.append(
                f"{replicas_per_node} data-parallel replicas per node each build an in-process vLLM engine, and "
                "vLLM's single-process executor takes device cuda:0 (its device config carries no index): "
                "untested on GPUs, expect every engine on the node's first GPU; one replica per node avoids it")
    g = cfg.grpo
    if g.prompts_per_step % dp:
        problems.append(f"grpo.prompts_per_step={g.prompts_per_step} is not divisible by the data-parallel "
                        f"size {dp} (world {world_size} ÷ TP×PP {tp * pp})")
    else:
        per_update = g.prompts_per_step // dp / g.updates_per_step
        if per_update % g.micro_batch_prompts:
            problems.append(f"grpo.micro_batch_prompts={g.micro_batch_prompts} does not divide the "
                            f"{per_update:g} prompts each data-parallel rank trains per update "
                            f"(prompts_per_step {g.prompts_per_step} ÷ DP {dp} ÷ updates_per_step "
                            f"{g.updates_per_step}): every micro-batch would be padded")
    if cfg.curriculum.background_scoring and cfg.curriculum.background_scorer == "child" and world_size != 1:
        problems.append(f"curriculum.background_scoring=true with curriculum.background_scorer child needs one "
                        f"process (its scorer is one more process beside it), not a world of {world_size}: set "
                        "curriculum.background_scorer external and launch the scoring job (`cropi serve-scoring`)")
    if cfg.scoring.mode == "batched" and cfg.model.layer_spec == "te":
        problems.append("scoring.mode batched sees megatron-core's local-spec modules only; with model.layer_spec "
                        "te use scoring.mode per_prompt, or layer_spec local")
    if cfg.scoring.mode == "batched" and cfg.model.layer_spec == "auto":
        warnings.append("model.layer_spec auto resolves to te where Transformer Engine is installed (GPU images), "
                        "which batched scoring cannot hook: set model.layer_spec local for GPU runs")
    return problems, warnings


def _path_problems(cfg: RunConfig) -> tuple[list[str], list[str], dict]:
    problems, warnings, rows = [], [], {}
    ok, why = _writable_dir(cfg.output_dir)
    if not ok:
        problems.append(f"run.output_dir: {why}")
    if cfg.data.kind == "files":
        for split in ("pool", "val", "test", "check"):
            for i, spec in enumerate(cfg.data.files(split)):
                n, errs = check_data_file(f"data.{split}[{i}]", spec)
                problems += errs
                rows.setdefault(split, {})
                source = spec.source or Path(spec.path).stem
                rows[split][source] = rows[split].get(source, 0) + n
        problems += check_tokenizer_dir("data.tokenizer", cfg.data.tokenizer)
    if cfg.rollout.tokenizer_dir:
        problems += check_tokenizer_dir("rollout.tokenizer_dir", cfg.rollout.tokenizer_dir)
    if cfg.rollout.checkpoint:
        errs, warns = check_hf_checkpoint("rollout.checkpoint", cfg.rollout.checkpoint, cfg.model)
        problems += errs
        warnings += warns
    return problems, warnings, rows


def _feature_stores(cfg: RunConfig, rows: dict) -> dict:
    """Size on disk of the feature stores: one per set (pool, each target set) per stage."""
    if cfg.selection.policy != "cropi" or not rows:
        return {}
    k = cfg.projection.k
    sets = {"pool": sum(rows.get("pool", {}).values())}
    sets.update({f"target-{name}": n for name, n in rows.get("val", {}).items()})
    dtype = cfg.scoring.feature_dtype
    per_stage = sum(feature_store_bytes(n, k, dtype) for n in sets.values())
    kept = 1 if cfg.curriculum.keep_features == "resume" else len(cfg.curriculum.scoring_stages())
    return {"label": f"computed: rows × k × {dtype}", "rows": sets, "k": k, "dtype": dtype,
            "per_stage_gib": round(per_stage / GIB, 3),
            "all_stages_gib": round(per_stage * kept / GIB, 3), "stages_kept": kept}


def _prompt_counts(cfg: RunConfig, rows: dict) -> tuple[int, int, str]:
    """``(pool prompts, target prompts, where from)``: the data files' rows, or the synthetic suite's sizes."""
    if cfg.data.kind == "synthetic":
        from megatron_cropi.data.synthetic import FAMILIES

        syn = cfg.data.synthetic
        return syn.per_family * len(syn.families or FAMILIES), syn.val_size, "data.synthetic sizes"
    return (sum(rows.get("pool", {}).values()), sum(rows.get("val", {}).values()), "the data files' rows")


# A stage that visits each selected prompt more often than this mostly re-trains prompts the policy has
# already solved (no GRPO gradient) and over-fits the subset (benchmarks/README.md, "selection ratio").
MAX_VISITS_PER_STAGE = 3.0
SELECTIVE_POLICIES = ("cropi", "random", "learnability", "online_learnability", "pass_rate_band")


def stage_visits(cfg: RunConfig, pool_prompts: int) -> dict | None:
    """How often one stage visits each selected prompt: ``steps_per_stage × prompts_per_step / m`` with
    ``m = int(selection.ratio × pool)``; None for policies that train on the whole pool."""
    if cfg.selection.policy not in SELECTIVE_POLICIES or pool_prompts <= 0:
        return None
    selected = max(1, int(cfg.selection.ratio * pool_prompts))
    visits = cfg.curriculum.steps_per_stage * cfg.grpo.prompts_per_step / selected
    ratio_needed = cfg.curriculum.steps_per_stage * cfg.grpo.prompts_per_step / (MAX_VISITS_PER_STAGE * pool_prompts)
    return {"selected_prompts": selected, "visits_per_prompt": round(visits, 2),
            "ratio_for_max_visits": round(min(1.0, ratio_needed), 3)}


def _visits_warning(cfg: RunConfig, visits: dict | None) -> list[str]:
    # a warm start (curriculum.selected_stages) repeats its selection only in its first stages, by design: the
    # ranking's gain comes within a stage, and the whole pool trains the rest
    # curriculum.select_every: a selection trains for that many stages, so its visits add up across them
    c = cfg.curriculum
    per_selection = visits["visits_per_prompt"] * c.select_every if visits is not None else 0.0
    if visits is None or per_selection <= MAX_VISITS_PER_STAGE or 0 < c.selected_stages < c.stages:
        return []
    held = (f", held for curriculum.select_every={c.select_every} stages, {per_selection:.1f} times in all"
            if c.select_every > 1 else "")
    return [f"selection.ratio={cfg.selection.ratio:g} selects {visits['selected_prompts']} prompts, which a stage of "
            f"curriculum.steps_per_stage={c.steps_per_stage} × grpo.prompts_per_step={cfg.grpo.prompts_per_step} "
            f"visits {visits['visits_per_prompt']:.1f} times each{held} (more than {MAX_VISITS_PER_STAGE:g}): later "
            f"visits mostly repeat prompts the policy already solves. Raise selection.ratio to about "
            f"{min(1.0, visits['ratio_for_max_visits'] * c.select_every):.3g} or shorten curriculum.steps_per_stage"]


def _refresh_warning(cfg: RunConfig) -> list[str]:
    """A refresh that never fires: every refresh stage lies past ``curriculum.selected_stages``."""
    c = cfg.curriculum
    if c.refresh_behaviour_every and 0 < c.selected_stages <= c.refresh_behaviour_every:
        return [f"curriculum.refresh_behaviour_every={c.refresh_behaviour_every} never re-rolls: only stages below "
                f"curriculum.selected_stages={c.selected_stages} select, and the first refresh is at stage "
                f"{c.refresh_behaviour_every} (set it to 0, or select for more stages)"]
    return []


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def _stages_text(time: dict, steps_per_stage: int) -> str:
    """The run's stages in words: every stage scores, or only the first ``curriculum.selected_stages``, or
    (``curriculum.select_every``) some of them."""
    steps = f"{steps_per_stage} GRPO steps × {time['grpo_step_s']:.1f} s"
    held = time["selecting_stages"] - time["scoring_stages"] if time["scoring_all_stages_s"] else 0
    hold = f"{held} of them hold an earlier selection (curriculum.select_every)" if held > 0 else ""
    if time["background_scoring"]:
        where = ("a scoring job on as many GPUs of its own" if time["background_scorer"] == "external" else
                 "a process beside the run, assumed not to slow its steps")
        return (f"{time['stages']} stages × {steps}, with scoring {_hours(time['scoring_per_stage_s'])} per selecting "
                f"stage{' that selects anew' if hold else ''} off the critical path (curriculum.background_scoring: "
                f"{where}; the selection trains from {time['switch_fraction']:.0%} into the stage"
                f"{'; ' + hold if hold else ''}) + {_hours(time['scoring_waits_s'])} of waiting for it")
    if time["scoring_stages"] == time["stages"] or not time["scoring_all_stages_s"]:
        return (f"{time['stages']} stages × {_hours(time['stage_s'])} (scoring {_hours(time['scoring_per_stage_s'])}"
                f" + {steps})")
    if time["selecting_stages"] == time["stages"]:
        return (f"{time['stages']} stages × {steps} + scoring {_hours(time['scoring_all_stages_s'])} at "
                f"{time['scoring_stages']} of them ({hold})")
    return (f"{time['stages']} stages × {steps} + scoring {_hours(time['scoring_all_stages_s'])} for the first "
            f"{time['selecting_stages']} (curriculum.selected_stages{'; ' + hold if hold else ''}; the rest train on "
            "the whole pool)")


def run_estimate(cfg: RunConfig, *, world_size: int, nodes: int, rows: dict) -> dict:
    """Time (per stage and total) and disk of the run by :mod:`megatron_cropi.cost`, with ``text``: the
    same in words, each line naming its assumptions."""
    pool, targets, source = _prompt_counts(cfg, rows)
    shape = shape_from_config(cfg, world_size=world_size, pool_prompts=pool, target_prompts=targets,
                              nodes=nodes, seq_length=sequence_length(cfg)[0])
    time, disk = estimate_run_time(cfg, shape), estimate_run_disk(cfg, shape)
    b = disk["bytes"]
    text = [
        f"time: ~{_hours(time['total_s'])} in all = {_stages_text(time, cfg.curriculum.steps_per_stage)}"
        + (f" (behaviour rollouts {_hours(time['behaviour_rollouts_s'])} in the scoring job, "
           "curriculum.background_rollouts: in the waits); " if time["background_rollouts"] else
           f" + behaviour rollouts {_hours(time['behaviour_rollouts_s'])}; ")
        + f"{pool} pool and {targets} target prompts ({source}), {world_size} GPUs",
        f"time assumes: {time['assumptions']}",
        f"disk: ~{disk['total_bytes'] / GIB:.1f} GiB at the end = trajectory stores "
        f"{b['trajectory_stores'] / GIB:.1f} + feature stores {b['feature_stores'] / GIB:.1f} "
        f"({disk['feature_stages_kept']} stages kept) + checkpoints {b['checkpoints'] / GIB:.1f} "
        f"({disk['checkpoints_kept']} kept) + HF exports {b['hf_exports'] / GIB:.1f} GiB",
        f"disk assumes: {disk['assumptions']}",
    ]
    return {"time_seconds": {k: v for k, v in time.items() if k != "assumptions"},
            "disk_bytes": {**b, "total": disk["total_bytes"]}, "text": text}


def engine_budget_problems(engine: dict | None, cfg: RunConfig) -> list[str]:
    """The vLLM engine's share against its weights and the stated KV-cache minimum, naming the keys."""
    if not engine or engine["fits"]:
        return []
    v, r = cfg.rollout.vllm, cfg.rollout
    graphs = (f", CUDA graphs {engine['cuda_graphs_gib']:.1f} GiB (rollout.vllm.enforce_eager=false)"
              if engine["cuda_graphs_gib"] else "")
    return [
        f"vLLM memory: rollout.vllm.gpu_memory_utilization={v.gpu_memory_utilization:g} gives the engine "
        f"{engine['share_gib']:.1f} GiB per GPU; its weights at rollout.vllm.tensor_parallel_size="
        f"{v.tensor_parallel_size} take {engine['weights_gib']:.1f} GiB ({cfg.model.num_parameters() / 1e9:.2f}B "
        f"parameters × {engine['dtype_bytes']} B ÷ {v.tensor_parallel_size}), workspace "
        f"{engine['workspace_gib']:.1f} GiB{graphs}, leaving {engine['kv_cache_gib']:.1f} GiB of KV cache; the "
        f"minimum is {engine['min_kv_cache_gib']:.1f} GiB: {engine['min_kv_sequences_from']} = "
        f"{engine['min_kv_sequences']} sequences of {engine['sequence_length']} tokens "
        f"({engine['sequence_length_from']}) × {engine['kv_bytes_per_token'] / 1024:g} KiB per token per GPU. "
        f"Raise rollout.vllm.gpu_memory_utilization or rollout.vllm.tensor_parallel_size, or lower "
        f"rollout.batch_prompts={r.batch_prompts}"]


def dry_run(cfg: RunConfig, *, world_size: int | None = None, gpus_per_node: int | None = None,
            gpu_memory_gib: float = 80.0) -> dict:
    """Validate what a launch of ``cfg`` on ``world_size`` ranks needs; return a summary.

    Args:
        cfg: a loaded (hence type- and range-checked) run config.
        world_size: ranks of the launch; default ``$WORLD_SIZE`` or TP×PP.
        gpus_per_node: ranks per node; default ``$LOCAL_WORLD_SIZE``, ``$NPROC_PER_NODE`` or the world size.
        gpu_memory_gib: memory of one GPU; the run fails the dry run when its estimate exceeds it.

    Raises:
        DryRunError: listing every layout, path or memory problem.
    """
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    world_size = world_size or int(os.environ.get("WORLD_SIZE", 0)) or tp * pp
    gpus_per_node = (gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", 0))
                     or int(os.environ.get("NPROC_PER_NODE", 0)) or world_size)
    problems: list[str] = []
    warnings: list[str] = []
    dp = None
    try:
        dp = check_layout(world_size, tp, pp)
    except LaunchError as err:
        problems.append(str(err))
    problems += cfg.model.layout_errors(tp, pp)
    if dp is not None:
        errs, warns = _layout_problems(cfg, dp, gpus_per_node, world_size)
        problems += errs
        warnings += warns
    errs, warns, rows = _path_problems(cfg)
    problems += errs
    warnings += warns
    memory = None
    if dp is not None and not cfg.model.layout_errors(tp, pp):
        memory = estimate_memory(cfg, dp=dp, gpu_memory_gib=gpu_memory_gib)
        if memory["peak_gib"] > gpu_memory_gib:
            s = memory["stages"][memory["peak_stage"]]
            problems.append(
                f"memory: the estimate for pipeline stage {s['stage']} is {s['peak_gib']:.1f} GiB per GPU "
                f"(in {s['peak_phase']}: resident {sum(s['resident_gib'].values()):.1f}, vLLM {s['vllm_gib']:.1f}, "
                f"training {sum(s['training_gib'].values()):.1f}, scoring {sum(s['scoring_gib'].values()):.1f} GiB), "
                f"over the {gpu_memory_gib:g} GiB budget (--gpu-memory-gib); reduce micro-batches, sequence "
                "length or vLLM's gpu_memory_utilization, or raise TP/PP")
        problems += engine_budget_problems(memory["vllm_engine"], cfg)
    if problems:
        raise DryRunError("dry run found problems:\n  - " + "\n  - ".join(problems))
    visits = stage_visits(cfg, _prompt_counts(cfg, rows)[0])
    warnings += _visits_warning(cfg, visits) + _refresh_warning(cfg)
    n_params = cfg.model.num_parameters()
    bytes_per = {"float32": 4, "bfloat16": 2, "float16": 2}[cfg.model.params_dtype]
    return {
        "world_size": world_size,
        "gpus_per_node": gpus_per_node,
        "nodes": max(1, world_size // gpus_per_node),
        "layout": {"tp": tp, "pp": pp, "dp": dp},
        "rollout": {"engine": cfg.rollout.engine, "vllm_tensor_parallel_size": cfg.rollout.vllm.tensor_parallel_size,
                    "engines": dp if cfg.rollout.engine == "vllm" else 0,
                    "vllm_memory": memory["vllm_engine"] if memory else None},
        "model": {
            "preset": cfg.model.preset,
            "parameters": n_params,
            "layers_per_stage": cfg.model.transformer["num_layers"] // pp,
            "param_bytes_per_rank": n_params * bytes_per // (tp * pp),
        },
        "data_rows": rows,
        "stage_visits": visits,
        "memory": memory,
        "feature_stores_on_disk": _feature_stores(cfg, rows),
        "estimate": run_estimate(cfg, world_size=world_size, nodes=max(1, world_size // gpus_per_node), rows=rows),
        "warnings": warnings,
        "output_dir": str(cfg.output_dir),
    }
