"""Per-GPU memory estimate of a run, and the size of its feature stores: pure arithmetic on the config.

Nothing here imports torch or touches a device, so ``cropi run --dry-run`` can size an 8×H100 launch
on a login node. Every figure is *computed*, never measured; the assumptions are stated below and in
each function's docstring, and ``docs/at_scale.md`` compares them with what can be measured.

A rank of pipeline stage ``p`` (TP size ``t``, PP size ``P``, DP size ``d``) holds, in bytes:

* **resident** (the whole run): ``N_p`` parameters of its TP shard of stage ``p`` (matrices and the
  embedding/output layer split ``t`` ways; norms replicated) as
    - weights: ``N_p × w`` (``w`` = 2 for bf16/fp16, 4 for fp32);
    - gradients: megatron DDP's contiguous buffer, ``N_p × 4`` with ``grad_reduce_in_fp32`` (else ``w``);
    - optimizer: Adam ``m``, ``v`` (fp32) plus an fp32 master copy when ``w < 4``: ``12 N_p`` (bf16) or
      ``8 N_p`` (fp32); SGD keeps momentum plus the master copy. The distributed optimizer shards it
      over DP (``÷ d``);
    - the frozen reference policy (``grpo.loss.kl_coef > 0``): another ``N_p × w``;
    - the projector's index cache: ``q × N_p × c`` with ``q`` the keep ratio and ``c`` bytes per kept
      coordinate (sjlt ``4 + 5s``, gaussian/rademacher 8, or 4 at ``q = 1``;
      :mod:`megatron_cropi.projection.sjlt` / ``.gaussian``);
    - a fixed ``overhead_gib`` (CUDA context, NCCL buffers, allocator slack).
* **vLLM**: ``gpu_memory_utilization × GPU memory``, held through scoring and training too (the
  engine lives in the trainer's process, ``colocated``). Charged on *every* pipeline stage: engines
  laid over every trainer rank (issue 14, vLLM's external launcher) put a share on each GPU; with one
  engine per replica on its first ``vllm.tensor_parallel_size`` GPUs this overcounts the other stages.
  Inside that share (:func:`engine_memory`) the engine holds its weights split over *its own* TP
  (``N × e / T_v``, ``e`` from ``rollout.vllm.dtype``), a workspace (:data:`ENGINE_WORKSPACE_GIB`:
  profiled activations and sampler logits), CUDA graphs unless ``enforce_eager``
  (:data:`CUDA_GRAPH_GIB`), and the KV cache: the rest. The dry run refuses a share whose KV cache
  cannot hold ``rollout.batch_prompts × rollout.n`` sequences of ``s`` tokens at
  ``2 × layers × ⌈g / T_v⌉ × head_dim × e`` bytes per token (:func:`kv_cache_bytes_per_token`).
* **training** (a GRPO micro-batch of ``b = micro_batch_prompts × rollout.n`` sequences of length
  ``s``) and **scoring** (``b = prompts_per_microbatch × K``, ``K = max(pool_samples, target_samples)``;
  ``per_prompt``: one prompt; with a token budget ``B = scoring.max_tokens_per_microbatch``,
  ``b = min(b, max(K, ⌈B / s⌉))``: a bound on the tokens, and on ``b·L²``, of a micro-batch of length
  ``L ≤ s``): activations (:func:`~megatron_cropi.memory_activations.layer_activation_bytes`) × layers
  of the stage × micro-batches in flight (1F1B: ``min(P − p, M)``), and on the last stage the logits
  and the log-prob's work on them (:func:`~megatron_cropi.memory_activations.logits_bytes`: chunked by
  ``scoring.logprob_chunk_tokens`` / ``grpo.logprob_chunk_tokens``, or whole at 0); scoring also the
  capture's transient (:func:`~megatron_cropi.memory_capture.capture_transient_bytes`: the largest
  module's block of per-prompt gradient, its factor chunks, SP gathers and projection temporaries;
  ``per_prompt``: the stage's largest parameter gradient).

``peak = resident + vLLM + max(training, scoring)`` per stage; the estimate is the largest stage.

Sequence length ``s = data.max_prompt_tokens + rollout.max_tokens`` (the synthetic suite: its prompt
length): micro-batches are padded to the longest sequence of the step or pool, and with thousands of
sampled responses the longest one reaches ``max_tokens``. Not modelled: allocator fragmentation
beyond the overhead, CUDA graphs, vLLM's own transient buffers beyond its share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_cropi.memory_activations import layer_activation_bytes, logits_bytes, stage_activation_bytes
from megatron_cropi.memory_capture import capture_transient_bytes
from megatron_cropi.popi.blocks import BLOCK_BYTES

__all__ = [
    "GIB",
    "ModelShape",
    "stage_parameter_counts",
    "optimizer_bytes_per_param",
    "index_cache_bytes_per_coordinate",
    "feature_store_bytes",
    "sequence_length",
    "kv_cache_bytes_per_token",
    "engine_memory",
    "estimate_memory",
]

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimate needs (from a :class:`~megatron_cropi.model.config.ModelConfig`)."""

    num_layers: int
    hidden: int
    heads: int
    query_groups: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool
    qkv_bias: bool
    gated: bool = True
    qk_norm: bool = False

    @classmethod
    def from_model_config(cls, cfg) -> "ModelShape":
        t = cfg.transformer
        return cls(num_layers=t["num_layers"], hidden=t["hidden_size"], heads=t["num_attention_heads"],
                   query_groups=cfg.num_query_groups,
                   head_dim=t.get("kv_channels") or t["hidden_size"] // t["num_attention_heads"],
                   ffn=cfg.ffn_hidden_size, vocab=cfg.vocab_size, tied=bool(cfg.tie_word_embeddings),
                   qkv_bias=bool(t.get("add_qkv_bias")), gated=bool(t.get("gated_linear_unit")),
                   qk_norm=bool(t.get("qk_layernorm")))


def stage_parameter_counts(m: ModelShape, tp: int, pp: int) -> list[int]:
    """Parameters held by one TP rank of each pipeline stage.

    Per layer: QKV ``h × (a + 2g)·d`` (+ bias), output projection ``a·d × h``, fc1 ``h × f`` (``2f``
    gated), fc2 ``f × h``, all split ``tp`` ways; two RMSNorm weights ``h``, replicated. Stage 0 holds
    the embedding ``V × h / tp``; the last stage the final norm and the output layer ``V × h / tp``
    (untied, or tied under PP > 1, where the last stage keeps its own copy).
    """
    q, kv = m.heads * m.head_dim, 2 * m.query_groups * m.head_dim
    sharded = m.hidden * (q + kv) + (q + kv if m.qkv_bias else 0) + q * m.hidden
    sharded += m.hidden * m.ffn * (2 if m.gated else 1) + m.ffn * m.hidden
    per_layer = sharded // tp + 2 * m.hidden
    layers = m.num_layers // pp
    emb = m.vocab * m.hidden // tp
    counts = [layers * per_layer for _ in range(pp)]
    counts[0] += emb
    counts[-1] += m.hidden + (emb if (not m.tied or pp > 1) else 0)
    return counts


def optimizer_bytes_per_param(optimizer: str, params_dtype: str) -> int:
    """Optimizer state bytes per parameter before DP sharding (fp32 master copy when params are 16-bit)."""
    master = 4 if DTYPE_BYTES[params_dtype] < 4 else 0
    return master + (8 if optimizer == "adam" else 4)


def index_cache_bytes_per_coordinate(kind: str, *, keep_ratio: float, sjlt_s: int = 1, cache_index: bool = True) -> int:
    """Bytes per *kept* coordinate of a projector's index cache (see the backends' docstrings)."""
    if not cache_index:
        return 0
    if kind == "sjlt":
        return (4 if keep_ratio < 1 else 0) + 5 * sjlt_s
    if kind in ("gaussian", "rademacher"):
        return 8 if keep_ratio < 1 else 4
    return 0  # dense (test oracle, tiny models) and registered backends: not modelled


def feature_store_bytes(rows: int, k: int, dtype: str = "float32") -> int:
    """One feature store on disk: ``rows × k`` values in ``dtype`` (``scoring.feature_dtype``), a status
    byte per row, and float16's fp32 scale per row."""
    from megatron_cropi.influence.feature_store import feature_bytes_per_row

    return rows * feature_bytes_per_row(dtype, k)


def sequence_length(cfg) -> tuple[int, str]:
    """``(s, how)``: the padded sequence length the estimate assumes, and where it comes from."""
    resp = cfg.rollout.max_tokens
    if cfg.scoring.seq_length:
        return cfg.scoring.seq_length, "scoring.seq_length"
    if cfg.data.kind == "synthetic":
        return cfg.data.synthetic.prompt_length + resp, "data.synthetic.prompt_length + rollout.max_tokens"
    if cfg.data.max_prompt_tokens:
        return cfg.data.max_prompt_tokens + resp, "data.max_prompt_tokens + rollout.max_tokens"
    return cfg.model.max_sequence_length, "model.max_sequence_length (set data.max_prompt_tokens for a tighter bound)"


ENGINE_WORKSPACE_GIB = 1.5
"""Per-GPU allowance inside vLLM's share for what its start-up profile measures besides weights: the
forward's activations at its default ``max_num_batched_tokens`` and the sampler's fp32 logits of
``max_num_seqs`` rows (full vocabulary on every engine TP rank). An assumption, not a measurement."""

CUDA_GRAPH_GIB = 1.0
"""Per-GPU allowance for vLLM's captured CUDA graphs (``enforce_eager: false``). An assumption."""


def kv_cache_bytes_per_token(m: ModelShape, *, engine_tp: int, kv_bytes: int) -> int:
    """KV-cache bytes one token takes on one GPU of an engine with tensor parallelism ``engine_tp``:
    ``2 (K, V) × layers × ⌈g / T_v⌉ × head_dim × e`` (vLLM replicates KV heads when ``T_v > g``)."""
    return 2 * m.num_layers * math.ceil(m.query_groups / engine_tp) * m.head_dim * kv_bytes


def _engine_dtype_bytes(cfg) -> int:
    d = cfg.rollout.vllm.dtype
    return DTYPE_BYTES[cfg.model.params_dtype] if d == "auto" else DTYPE_BYTES[d]


def engine_memory(cfg, *, gpu_memory_gib: float = 80.0, min_kv_sequences: int | None = None) -> dict | None:
    """What the vLLM engine needs inside its share of one GPU, or ``None`` for the native engine.

    ``share = rollout.vllm.gpu_memory_utilization × gpu_memory_gib``. On each of the
    ``T_v = rollout.vllm.tensor_parallel_size`` GPUs of an engine: weights ``N × e / T_v`` (``N`` the
    model's parameters, ``e`` the bytes of ``rollout.vllm.dtype``, ``auto``: ``model.params_dtype``),
    :data:`ENGINE_WORKSPACE_GIB`, :data:`CUDA_GRAPH_GIB` unless ``enforce_eager``; the KV cache gets the
    rest. The stated minimum of KV cache: ``min_kv_sequences`` (default ``rollout.batch_prompts ×
    rollout.n``: one rollout call's responses decoding together at full length without preemption)
    sequences of ``s`` tokens (:func:`sequence_length`). Larger calls (the target set's
    ``curriculum.target_samples`` responses, a GRPO step's prompts) still run: vLLM queues what does
    not fit.
    """
    if cfg.rollout.engine != "vllm":
        return None
    v, r = cfg.rollout.vllm, cfg.rollout
    m = ModelShape.from_model_config(cfg.model)
    e = _engine_dtype_bytes(cfg)
    seq, seq_how = sequence_length(cfg)
    share = v.gpu_memory_utilization * gpu_memory_gib * GIB
    weights = cfg.model.num_parameters() * e / v.tensor_parallel_size
    workspace = ENGINE_WORKSPACE_GIB * GIB
    graphs = 0.0 if v.enforce_eager else CUDA_GRAPH_GIB * GIB
    per_token = kv_cache_bytes_per_token(m, engine_tp=v.tensor_parallel_size, kv_bytes=e)
    sequences = min_kv_sequences if min_kv_sequences is not None else r.batch_prompts * r.n
    need = sequences * seq * per_token
    kv = share - weights - workspace - graphs
    return {
        "share_gib": round(share / GIB, 3),
        "tensor_parallel_size": v.tensor_parallel_size,
        "dtype_bytes": e,
        "weights_gib": round(weights / GIB, 3),
        "workspace_gib": ENGINE_WORKSPACE_GIB,
        "cuda_graphs_gib": round(graphs / GIB, 3),
        "kv_cache_gib": round(kv / GIB, 3),
        "kv_bytes_per_token": per_token,
        "kv_cache_tokens": max(0, int(kv // per_token)),
        "min_kv_sequences": sequences,
        "min_kv_sequences_from": ("min_kv_sequences" if min_kv_sequences is not None
                                  else f"rollout.batch_prompts {r.batch_prompts} × rollout.n {r.n}"),
        "sequence_length": seq,
        "sequence_length_from": seq_how,
        "min_kv_cache_gib": round(need / GIB, 3),
        "fits": kv >= need,
    }


def _recompute(transformer: dict) -> tuple[str | None, str | None, int | None]:
    g = transformer.get("recompute_granularity")
    return g, transformer.get("recompute_method"), transformer.get("recompute_num_layers")


def estimate_memory(cfg, *, dp: int, gpu_memory_gib: float = 80.0, attention: str | None = None,
                    overhead_gib: float = 2.0, min_kv_sequences: int | None = None) -> dict:
    """Per-GPU memory of ``cfg`` with ``dp`` data-parallel replicas (see the module docstring).

    Args:
        cfg: a :class:`~megatron_cropi.run_config.RunConfig`.
        dp: data-parallel size of the launch.
        gpu_memory_gib: memory of one GPU (vLLM's share is a fraction of it).
        attention: ``unfused`` or ``flash``; default from ``model.layer_spec`` (``te`` → flash, else
            unfused: ``auto`` is sized for the local spec, the larger of the two).
        overhead_gib: fixed per-GPU allowance for the CUDA context, NCCL and the allocator.
        min_kv_sequences: the engine's stated KV-cache minimum in sequences (:func:`engine_memory`).

    Returns:
        A JSON-ready dict: ``stages`` (per-stage breakdown in GiB), ``peak_gib`` (the largest stage),
        ``assumptions``.
    """
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    m = ModelShape.from_model_config(cfg.model)
    w = DTYPE_BYTES[cfg.model.params_dtype]
    optim, loss = cfg.grpo.optim, cfg.grpo.loss
    attention = attention or ("flash" if cfg.model.layer_spec == "te" else "unfused")
    sp = bool(cfg.model.transformer.get("sequence_parallel"))
    recompute = _recompute(cfg.model.transformer)
    seq, seq_how = sequence_length(cfg)
    cc, sc, proj = cfg.curriculum, cfg.scoring, cfg.projection

    grad_b = 4 if optim.grad_reduce_in_fp32 else w
    opt_b = optimizer_bytes_per_param(optim.optimizer, cfg.model.params_dtype)
    opt_shard = dp if optim.use_distributed_optimizer else 1
    cache_b = index_cache_bytes_per_coordinate(proj.kind, keep_ratio=proj.keep_ratio, sjlt_s=proj.sjlt_s,
                                               cache_index=proj.cache_index)
    vllm_gib = cfg.rollout.vllm.gpu_memory_utilization * gpu_memory_gib if cfg.rollout.engine == "vllm" else 0.0
    vllm_tp = cfg.rollout.vllm.tensor_parallel_size

    train_b = cfg.grpo.micro_batch_prompts * cfg.rollout.n
    per_rank = max(1, cfg.grpo.prompts_per_step // max(dp, 1) // cfg.grpo.updates_per_step)
    train_mbs = max(1, math.ceil(per_rank / cfg.grpo.micro_batch_prompts))
    k_max = max(cc.pool_samples, cc.target_samples)
    ppm = 1 if sc.mode == "per_prompt" else sc.prompts_per_microbatch
    score_b, score_mbs = ppm * k_max, sc.microbatches_per_call
    if sc.max_tokens_per_microbatch:
        # length-aware micro-batches hold <= min(ppm·K·s, max(B, K·s)) tokens: as sequences of length s
        score_b = min(score_b, max(k_max, math.ceil(sc.max_tokens_per_microbatch / seq)))
    train_layer = layer_activation_bytes(m, seq=seq, micro_batch=train_b, tp=tp, attention=attention,
                                         sequence_parallel=sp, act_bytes=w)
    score_layer = layer_activation_bytes(m, seq=seq, micro_batch=score_b, tp=tp, attention=attention,
                                         sequence_parallel=sp, act_bytes=w)
    counts = stage_parameter_counts(m, tp, pp)
    layers = m.num_layers // pp
    capture = [capture_transient_bytes(m, mode=sc.mode, tp=tp, seq=seq, groups=max(1, score_b // k_max),
                                       responses=k_max, act_bytes=w, param_bytes=w, first_stage=p == 0,
                                       last_stage=p == pp - 1, sequence_parallel=sp, projection=proj.kind,
                                       keep_ratio=proj.keep_ratio, sjlt_s=proj.sjlt_s) for p in range(pp)]

    stages = []
    for p, n_p in enumerate(counts):
        last = p == pp - 1
        in_flight_train, in_flight_score = min(pp - p, train_mbs), min(pp - p, score_mbs)
        resident = {
            "weights": n_p * w,
            "gradients": n_p * grad_b,
            "optimizer": n_p * opt_b // opt_shard,
            "reference_model": n_p * w if loss.kl_coef > 0 else 0,
            "projector_index_cache": int(proj.keep_ratio * n_p) * cache_b,
            "overhead": int(overhead_gib * GIB),
        }
        train = {
            "activations": stage_activation_bytes(train_layer, layers=layers, in_flight=in_flight_train,
                                                  recompute=recompute[0], recompute_method=recompute[1],
                                                  recompute_num_layers=recompute[2]),
            "logits": logits_bytes(m.vocab, tp=tp, seq=seq, micro_batch=train_b,
                                   fp32_copies=5 if loss.entropy_coef > 0 else 3, act_bytes=w,
                                   chunk_tokens=cfg.grpo.logprob_chunk_tokens,
                                   logit_grads=2 if loss.entropy_coef > 0 else 1) if last else 0,
        }
        score = {
            "activations": stage_activation_bytes(score_layer, layers=layers, in_flight=in_flight_score,
                                                  recompute=recompute[0], recompute_method=recompute[1],
                                                  recompute_num_layers=recompute[2]),
            "logits": logits_bytes(m.vocab, tp=tp, seq=seq, micro_batch=score_b, fp32_copies=3,
                                   act_bytes=w, chunk_tokens=sc.logprob_chunk_tokens) if last else 0,
            "capture": capture[p]["bytes"],
        }
        holds_vllm = vllm_gib > 0  # every GPU (module docstring)
        res, tr, scr = sum(resident.values()), sum(train.values()), sum(score.values())
        vl = vllm_gib * GIB if holds_vllm else 0.0
        stages.append({
            "stage": p,
            "parameters": n_p,
            "resident_gib": {k: round(v / GIB, 3) for k, v in resident.items()},
            "vllm_gib": round(vl / GIB, 3),
            "training_gib": {k: round(v / GIB, 3) for k, v in train.items()},
            "scoring_gib": {k: round(v / GIB, 3) for k, v in score.items()},
            "capture_peak_module": capture[p]["module"],
            "peak_bytes": int(res + vl + max(tr, scr)),
            "peak_gib": round((res + vl + max(tr, scr)) / GIB, 3),
            "peak_phase": "training" if tr >= scr else "scoring",
        })
    peak = max(stages, key=lambda s: s["peak_bytes"])
    return {
        "label": "computed (megatron_cropi/memory.py), not measured",
        "gpu_memory_gib": gpu_memory_gib,
        "peak_gib": peak["peak_gib"],
        "peak_bytes": peak["peak_bytes"],
        "peak_stage": peak["stage"],
        "stages": stages,
        "vllm_engine": engine_memory(cfg, gpu_memory_gib=gpu_memory_gib, min_kv_sequences=min_kv_sequences),
        "assumptions": {
            "sequence_length": seq, "sequence_length_from": seq_how, "attention": attention,
            "sequence_parallel": sp, "recompute": recompute[0] or "none",
            "training_micro_batch_sequences": train_b, "training_microbatches_per_step": train_mbs,
            "scoring_micro_batch_sequences": score_b, "scoring_microbatches_per_call": score_mbs,
            "capture_block_bytes": BLOCK_BYTES,
            "logprob_chunk_tokens": {"scoring": sc.logprob_chunk_tokens, "training": cfg.grpo.logprob_chunk_tokens},
            "vllm": ({"share_gib": round(vllm_gib, 3), "tensor_parallel_size": vllm_tp, "colocated": True,
                      "held_through_scoring_and_training": True, "charged_on": "every pipeline stage"}
                     if cfg.rollout.engine == "vllm" else None),
            "overhead_gib": overhead_gib,
        },
    }
