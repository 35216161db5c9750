"""The weight push's stream (``grpo/weight_sync.iter_hf_weight_buckets``): on every rank of every layout
(TP2×DP2, PP2×DP2, TP2×PP2; tied and untied embeddings; bf16 and fp32) it yields exactly the HF
tensors of the whole model, bit for bit, in the training dtype, through small buckets (many gathers),
equal to the old world-wide reassembly (``megatron_to_hf_named_tensors``); a rank that drains it
without an engine does not block the others."""

import pytest

from megatron_cropi.testing.spawn import run_ranks


def _worker(layouts):
    import torch
    import torch.distributed as dist

    from megatron_cropi.checkpoint import megatron_to_hf_named_tensors
    from megatron_cropi.grpo.weight_sync import iter_hf_weight_buckets
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed()
    out = {}
    for tp, pp, preset, dtype in layouts:
        g = build_parallel_groups(tp, pp)
        cfg = tiny_model_config(preset, params_dtype=dtype)
        model = build_tiny_model(cfg, g, seed=3)
        reference = dict(megatron_to_hf_named_tensors(model, g, dst=None))
        streamed = {}
        for name, t in iter_hf_weight_buckets(model, g, bucket_bytes=40_000):
            streamed[name] = t.detach().clone()
        same = reference.keys() == streamed.keys() and all(
            reference[k].dtype == streamed[k].dtype and reference[k].shape == streamed[k].shape
            and torch.equal(reference[k].contiguous().view(torch.uint8), streamed[k].contiguous().view(torch.uint8))
            for k in reference)
        out[(tp, pp, preset, dtype)] = {"same": same, "names": len(streamed),
                                        "dtype": str(next(iter(streamed.values())).dtype)}
        dist.barrier()
        destroy_parallel_groups()
    return out


@pytest.mark.timeout(400)
def test_bucket_stream_is_the_whole_model_bit_for_bit_on_every_rank():
    layouts = [(2, 1, "tiny-vllm", "bfloat16"), (1, 2, "tiny-vllm", "float32"), (2, 2, "cpu-default", "bfloat16")]
    results = run_ranks(_worker, 4, args=(layouts,), timeout_s=380)
    for rank, res in enumerate(results):
        for key, r in res.items():
            assert r["same"] and r["names"] > 5, (rank, key, r)
            assert r["dtype"] == f"torch.{key[3]}", (rank, key, r)
