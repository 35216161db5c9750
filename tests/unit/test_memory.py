"""The per-GPU memory estimate (megatron_cropi/memory.py, memory_activations.py) against hand-computed numbers.

The hand case: 2 layers, hidden 8, 2 query heads of 4, 1 KV group, ffn 12, vocab 16, untied, QKV
bias. Per layer: QKV 8×16 + 16 bias, output projection 8×8, fc1 8×24, fc2 12×8 = 496 sharded
parameters, plus two norms of 8.
"""

import pytest

from megatron_cropi.config.loader import from_dict
from megatron_cropi.run_config import RunConfig
from megatron_cropi.memory import (
    CUDA_GRAPH_GIB,
    ENGINE_WORKSPACE_GIB,
    GIB,
    ModelShape,
    engine_memory,
    estimate_memory,
    kv_cache_bytes_per_token,
    feature_store_bytes,
    index_cache_bytes_per_coordinate,
    optimizer_bytes_per_param,
    stage_parameter_counts,
)
from megatron_cropi.memory_activations import layer_activation_bytes, logits_bytes, stage_activation_bytes

SHAPE = ModelShape(num_layers=2, hidden=8, heads=2, query_groups=1, head_dim=4, ffn=12, vocab=16, tied=False,
                   qkv_bias=True)
MODEL = {"preset": "custom", "vocab_size": 16, "max_sequence_length": 32, "tie_word_embeddings": False,
         "rotary_base": 10000.0, "params_dtype": "bfloat16",
         "transformer": {"num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "num_query_groups": 1,
                         "ffn_hidden_size": 12}}


def test_stage_parameters_by_hand_and_against_the_model_count():
    assert stage_parameter_counts(SHAPE, 1, 1) == [2 * 512 + 128 + 8 + 128]
    # TP=2, PP=2: 496/2 + 16 per layer, one layer per stage; embedding 128/2 on stage 0, norm + output on 1
    assert stage_parameter_counts(SHAPE, 2, 2) == [264 + 64, 264 + 8 + 64]
    cfg = from_dict(RunConfig, {"model": MODEL})
    assert sum(stage_parameter_counts(ModelShape.from_model_config(cfg.model), 1, 1)) == cfg.model.num_parameters()
    tied = from_dict(RunConfig, {"model": {"preset": "qwen2.5-1.5b"}}).model
    shape = ModelShape.from_model_config(tied)
    assert sum(stage_parameter_counts(shape, 1, 1)) == tied.num_parameters()
    # under PP the last stage keeps its own copy of a tied embedding
    assert sum(stage_parameter_counts(shape, 1, 2)) == tied.num_parameters() + tied.vocab_size * 1536


def test_layer_activations_by_hand():
    # s = 4, b = 2, e = 2: inputs 4·2·8·8 = 512, context 2·8·8 = 128, MLP 4·2·8·12 = 768,
    # unfused core: Q, K, V expanded 2·8·24 = 384 + (4 + 2)·s²·b·a = 6·16·2·2 = 384
    unfused = layer_activation_bytes(SHAPE, seq=4, micro_batch=2, tp=1, attention="unfused")
    assert unfused == {"full": 512 + 128 + 768 + 768, "core_attention": 768, "core_inputs": 256, "input": 128}
    flash = layer_activation_bytes(SHAPE, seq=4, micro_batch=2, tp=1, attention="flash")
    assert flash["full"] == 512 + 128 + 256 + 768
    # TP splits everything but the layer inputs (no sequence parallelism) ...
    tp2 = layer_activation_bytes(SHAPE, seq=4, micro_batch=2, tp=2, attention="unfused")
    assert tp2["full"] == 512 + (128 + 768 + 768) // 2
    # ... which sequence parallelism splits too
    sp = layer_activation_bytes(SHAPE, seq=4, micro_batch=2, tp=2, attention="unfused", sequence_parallel=True)
    assert sp["full"] == (512 + 128 + 768 + 768) // 2
    with pytest.raises(ValueError, match="attention"):
        layer_activation_bytes(SHAPE, seq=4, micro_batch=2, tp=1, attention="sdpa")


def test_stage_activations_under_recomputation():
    layer = layer_activation_bytes(SHAPE, seq=4, micro_batch=2, tp=1)
    assert stage_activation_bytes(layer, layers=2, in_flight=2) == 2 * 2 * 2176
    # selective: core attention (768) replaced by its inputs (256) per layer, one layer rebuilt
    assert stage_activation_bytes(layer, layers=2, in_flight=2, recompute="selective") == 2 * 2 * 1664 + 768
    # full, uniform, 1 layer per chunk: each layer keeps its input (128), one layer rebuilt
    assert stage_activation_bytes(layer, layers=2, in_flight=2, recompute="full", recompute_method="uniform",
                                  recompute_num_layers=1) == 2 * 2 * 128 + 2176
    assert stage_activation_bytes(layer, layers=2, in_flight=1, recompute="full", recompute_method="block",
                                  recompute_num_layers=1) == 128 + 2176 + 2176


def test_logits_optimizer_cache_and_store_sizes():
    # whole-tensor log-prob (chunk 0): bf16 logits + 3 (5 with entropy) fp32 copies of [N, V/t]
    assert logits_bytes(16, tp=2, seq=4, micro_batch=2, fp32_copies=3) == 8 * 4 * 2 * 14
    assert logits_bytes(16, tp=1, seq=4, micro_batch=2, fp32_copies=5) == 16 * 4 * 2 * 22
    # chunked: bf16 logits + their gradient(s) over all N = 8 positions, 4 fp32 [c, V/t] work tensors
    assert logits_bytes(16, tp=2, seq=4, micro_batch=2, fp32_copies=3, chunk_tokens=3) == 8 * (8 * 2 * 2 + 3 * 16)
    assert logits_bytes(16, tp=1, seq=4, micro_batch=2, fp32_copies=5, chunk_tokens=3,
                        logit_grads=2) == 16 * (8 * 2 * 3 + 3 * 16)
    assert logits_bytes(16, tp=1, seq=4, micro_batch=2, fp32_copies=3, chunk_tokens=1024) == 16 * (8 * 2 * 2 + 8 * 16)
    # at scale the fp32 copies dominate: 1.5B scoring, 16 sequences of 2560 at TP2: 14 B -> 4 B per logit
    whole = logits_bytes(151936, tp=2, seq=2560, micro_batch=16, fp32_copies=3)
    chunked = logits_bytes(151936, tp=2, seq=2560, micro_batch=16, fp32_copies=3, chunk_tokens=1024)
    assert 3.0 < whole / chunked < 3.5
    assert optimizer_bytes_per_param("adam", "bfloat16") == 12
    assert optimizer_bytes_per_param("adam", "float32") == 8
    assert optimizer_bytes_per_param("sgd", "bfloat16") == 8
    assert index_cache_bytes_per_coordinate("sjlt", keep_ratio=0.1) == 9
    assert index_cache_bytes_per_coordinate("sjlt", keep_ratio=0.1, sjlt_s=4) == 24
    assert index_cache_bytes_per_coordinate("gaussian", keep_ratio=0.1) == 8
    assert index_cache_bytes_per_coordinate("gaussian", keep_ratio=1.0) == 4
    assert index_cache_bytes_per_coordinate("sjlt", keep_ratio=0.1, cache_index=False) == 0
    assert feature_store_bytes(10, 4) == 10 * 4 * 4 + 10


CAPTURE = 512 + 768 + 1024  # batched capture's transient in the hand case (test_estimate_of_a_whole_run_by_hand)


def _cfg(**over):
    d = {"model": MODEL, "scoring": {"seq_length": 4, "prompts_per_microbatch": 1},
         "rollout": {"n": 2}, "curriculum": {"pool_samples": 2, "target_samples": 2},
         "projection": {"kind": "sjlt", "k": 8, "keep_ratio": 0.5},
         "grpo": {"prompts_per_step": 2, "micro_batch_prompts": 1, "loss": {"kl_coef": 0.001, "entropy_coef": 0.001}}}
    for key, value in over.items():
        d[key] = {**d.get(key, {}), **value}
    return from_dict(RunConfig, d)


def test_estimate_of_a_whole_run_by_hand():
    est = estimate_memory(_cfg(), dp=2, overhead_gib=0.0)
    (stage,) = est["stages"]
    n = 1288
    resident = n * 2 + n * 4 + n * 12 // 2 + n * 2 + int(0.5 * n) * 9   # weights, fp32 grads, Adam/DP, reference, cache
    # 1 micro-batch of 2 sequences in flight; chunked logits of N = 8 positions (chunk 1024 > N):
    # bf16 logits + 2 bf16 gradients (entropy bonus) + 4 fp32 chunk copies; scoring: 1 gradient
    train = 2 * 2176 + 16 * (8 * 2 * 3 + 8 * 16)
    # + capture's transient (memory_capture.py), the QKV's (= the output layer's) [16, 8] per-prompt
    # gradient in fp32 512 + its fp32 factors 4·2·4·(8 + 16) = 768 + sjlt's temporaries for its 64 kept
    # coordinates 4·64 + 12·64 = 1024
    score = 2 * 2176 + 16 * (8 * 2 * 2 + 8 * 16) + CAPTURE
    assert stage["peak_bytes"] == resident + max(train, score) == est["peak_bytes"]
    assert stage["peak_phase"] == "scoring"
    assert est["assumptions"]["logprob_chunk_tokens"] == {"scoring": 1024, "training": 1024}
    # chunk 0: the whole-tensor path's 3 (5) fp32 copies
    whole = estimate_memory(_cfg(scoring={"logprob_chunk_tokens": 0}, grpo={"logprob_chunk_tokens": 0}), dp=2,
                            overhead_gib=0.0)
    assert whole["peak_bytes"] == resident + max(2 * 2176 + 16 * 4 * 2 * 22, 2 * 2176 + 16 * 4 * 2 * 14 + CAPTURE)
    assert est["assumptions"]["sequence_length"] == 4 and est["assumptions"]["vllm"] is None


def test_estimate_counts_vllm_share_reference_and_pipeline_in_flight():
    base = estimate_memory(_cfg(), dp=1, overhead_gib=0.0)["peak_bytes"]
    no_kl = estimate_memory(_cfg(grpo={"loss": {"kl_coef": 0.0, "entropy_coef": 0.001}}), dp=1, overhead_gib=0.0)
    assert base - no_kl["peak_bytes"] == 1288 * 2            # the reference model's bf16 weights
    vllm = _cfg(rollout={"engine": "vllm", "checkpoint": "x", "vllm": {"gpu_memory_utilization": 0.25}})
    est = estimate_memory(vllm, dp=1, gpu_memory_gib=8.0, overhead_gib=0.0)
    assert est["peak_bytes"] == base + 2 * 1024 ** 3     # 0.25 × 8 GiB on the engine's GPU
    # PP=2, 4 micro-batches: stage 0 (640 parameters) holds min(PP, 4) = 2 micro-batches of its one
    # layer and no logits; stage 1 (648) one micro-batch and the logits
    pp = estimate_memory(_cfg(parallel={"pipeline_model_parallel_size": 2}, grpo={"prompts_per_step": 4}),
                         dp=1, overhead_gib=0.0)
    s0, s1 = pp["stages"]
    assert pp["assumptions"]["training_microbatches_per_step"] == 4
    assert (s0["parameters"], s1["parameters"]) == (640, 648)
    assert s0["peak_bytes"] == 640 * 20 + 320 * 9 + max(2 * 2176, 2 * 2176 + CAPTURE)
    assert s1["peak_bytes"] == 648 * 20 + 324 * 9 + max(2176 + 16 * (8 * 2 * 3 + 8 * 16),
                                                        2176 + 16 * (8 * 2 * 2 + 8 * 16) + CAPTURE)
    assert (s0["peak_phase"], s1["peak_phase"]) == ("scoring", "scoring")


def test_feature_store_bytes_follow_the_storage_dtype():
    # k values per row + a status byte; float16 adds its fp32 row scale
    assert feature_store_bytes(10, 4, "float32") == 10 * (4 * 4 + 1)
    assert feature_store_bytes(10, 4, "float16") == 10 * (4 * 2 + 4 + 1)
    assert feature_store_bytes(10, 4, "bfloat16") == 10 * (4 * 2 + 1)


def test_kv_cache_bytes_per_token_by_hand():
    # 2 (K, V) × layers × KV heads on the GPU × head_dim × bytes
    assert kv_cache_bytes_per_token(SHAPE, engine_tp=1, kv_bytes=2) == 2 * 2 * 1 * 4 * 2
    qwen7b = ModelShape(num_layers=28, hidden=3584, heads=28, query_groups=4, head_dim=128, ffn=18944,
                        vocab=152064, tied=False, qkv_bias=True)
    assert kv_cache_bytes_per_token(qwen7b, engine_tp=1, kv_bytes=2) == 57344          # 56 KiB
    assert kv_cache_bytes_per_token(qwen7b, engine_tp=4, kv_bytes=2) == 14336          # one KV head per GPU
    assert kv_cache_bytes_per_token(qwen7b, engine_tp=8, kv_bytes=2) == 14336          # replicated past 4


def _vllm(**vllm):
    return _cfg(rollout={"engine": "vllm", "checkpoint": "x", "batch_prompts": 3,
                         "vllm": {"dtype": "bfloat16", "gpu_memory_utilization": 0.5, **vllm}})


def test_engine_memory_by_hand():
    assert engine_memory(_cfg()) is None                      # the native engine has no share
    e = engine_memory(_vllm(), gpu_memory_gib=4.0)
    share = 0.5 * 4 * GIB
    weights = 1288 * 2                                         # all parameters in bf16 at engine TP 1
    kv = share - weights - ENGINE_WORKSPACE_GIB * GIB          # enforce_eager (the default): no graphs
    assert e["share_gib"] == 2.0 and e["weights_gib"] == round(weights / GIB, 3)
    assert e["kv_cache_gib"] == round(kv / GIB, 3) and e["cuda_graphs_gib"] == 0.0
    assert e["kv_bytes_per_token"] == 32 and e["kv_cache_tokens"] == int(kv // 32)
    # the minimum: batch_prompts 3 × n 2 sequences of s = 4 tokens (scoring.seq_length)
    assert (e["min_kv_sequences"], e["sequence_length"]) == (6, 4)
    assert e["min_kv_cache_gib"] == round(6 * 4 * 32 / GIB, 3) and e["fits"]
    # the engine's own TP splits its weights; float32 doubles weights and KV
    tp2 = engine_memory(_vllm(tensor_parallel_size=2, dtype="float32"), gpu_memory_gib=4.0)
    assert tp2["weights_gib"] == round(1288 * 4 / 2 / GIB, 3) and tp2["kv_bytes_per_token"] == 64
    # CUDA graphs take their allowance from the KV cache: 2 GiB - 1.5 - 1 leaves none
    graphs = engine_memory(_vllm(enforce_eager=False), gpu_memory_gib=4.0)
    assert graphs["cuda_graphs_gib"] == CUDA_GRAPH_GIB and not graphs["fits"] and graphs["kv_cache_tokens"] == 0
    # a stated minimum in sequences replaces batch_prompts × n
    big = engine_memory(_vllm(), gpu_memory_gib=4.0, min_kv_sequences=10 ** 7)
    assert big["min_kv_sequences"] == 10 ** 7 and not big["fits"]
    assert estimate_memory(_vllm(), dp=1, gpu_memory_gib=4.0)["vllm_engine"] == e


def test_vllm_share_is_charged_on_every_pipeline_stage():
    cfg_pp = _cfg(rollout={"engine": "vllm", "checkpoint": "x", "vllm": {"gpu_memory_utilization": 0.25}},
                  parallel={"pipeline_model_parallel_size": 2})
    est = estimate_memory(cfg_pp, dp=1, gpu_memory_gib=8.0, overhead_gib=0.0)
    assert [s["vllm_gib"] for s in est["stages"]] == [2.0, 2.0]
    assert est["assumptions"]["vllm"]["charged_on"] == "every pipeline stage"
