"""Per-rank memory and rank-0 traffic of scoring a pool at scale (``docs/at_scale.md``, the 1M-prompt case):
rank-0 scoring against scale-out scoring (:mod:`megatron_cropi.influence.scale_out`), by arithmetic."""

from __future__ import annotations

from megatron_cropi.cost import GPUS_PER_NODE, STORE_BYTES_PER_PROMPT_TOKEN, STORE_BYTES_PER_RESPONSE_TOKEN

__all__ = ["scale_out_footprint"]

INDEX_BYTES_PER_ROW = 48    # a trajectory store's sorted prompt-id index (rollout/row_index.py): 32-byte ids, part and
                            # row (int32), the by-part grouping (int64)
SUMMARY_BYTES_PER_ROW = 17  # scale-out's per-row scalars: longest, tokens (int64), zero-variance (bool)
COLUMN_BYTES_PER_ROW = 12   # scale-out selection's per-row columns on every rank: pass rate (float64), source code (int32)
# Measured beside these (benchmarks/scale_out.py, 512 → 32,768 prompts, DP 4): a rank's private memory grew
# 182 bytes a prompt: the layout above (77) plus what the allocators keep of freed blocks.
COSINE_BYTES_PER_ROW = 9    # per scored row to rank 0: row id (int64) + usable (bool); + 8 per direction (float64)
TOP_M_COUNT_BYTES = 8192    # the distributed top-m's, quantiles' and summary's all-reduced counts (~600 int64), a bound


def scale_out_footprint(*, pool_prompts: int, nodes: int, tp: int, pp: int, k: int, feature_bytes: int,
                        responses: int, mean_response_tokens: float, prompt_tokens: float, live_fraction: float,
                        prompts_per_unit: int, directions: int = 1,
                        gpus_per_node: int = GPUS_PER_NODE) -> dict:
    """Per-rank memory and the bytes global rank 0 receives when scoring a pool and meeting for selection:
    rank-0 scoring (every rank holds the pool's rollouts; rank 0 gathers every live row's float32
    k-vector and writes the store) against scale-out scoring (:mod:`megatron_cropi.influence.scale_out`).

    Rollouts in memory count their token ids and log-probs only (``STORE_BYTES_PER_*``): the Python
    objects around them add more, so the rank-0 figure is a lower bound. Scale-out's per-rank figure is
    the arrays' layout; the CPU benchmark measured about 2.4× it per prompt in private memory (allocator
    retention), and while a rank scores it also maps the store's pages it reads from the page cache
    (clean, shared by a node's ranks, reclaimable).

    Under scale-out a cropi selection is made and written where the cosines are (each rank writes its
    own picks): rank 0 receives a bounded number of counts (``rank0_receives_bytes``), whatever the pool
    and DP; every rank reads the pool's id, pass-rate and source columns (rank 0 writes the summary
    from them) and the picks from disk. The policies that read every row's score meet the scored rows'
    cosines on rank 0 (``rank0_receives_bytes_cosines_met``)."""
    dp = nodes * gpus_per_node // (tp * pp)
    per_prompt = responses * mean_response_tokens * STORE_BYTES_PER_RESPONSE_TOKEN + prompt_tokens * STORE_BYTES_PER_PROMPT_TOKEN
    live = live_fraction * pool_prompts
    return {
        "pool_prompts": pool_prompts, "nodes": nodes, "dp": dp,
        "rank0_path": {"per_rank_rollouts_bytes": int(pool_prompts * per_prompt),
                       "rank0_receives_bytes": int(live * k * 4 * (dp - 1) / dp),
                       "rank0_writes_bytes": int(pool_prompts * k * feature_bytes)},
        "scale_out": {"per_rank_bytes": int(pool_prompts * (SUMMARY_BYTES_PER_ROW + INDEX_BYTES_PER_ROW
                                                            + COLUMN_BYTES_PER_ROW)
                                            + prompts_per_unit * per_prompt),
                      "rank0_receives_bytes": TOP_M_COUNT_BYTES,
                      "rank0_receives_bytes_cosines_met": int(live * (COSINE_BYTES_PER_ROW + 8 * directions)),
                      "shard_bytes_per_replica": int(live * k * feature_bytes / dp)},
    }
