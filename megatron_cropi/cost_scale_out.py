"""Per-rank memory and rank-0 traffic of scoring a pool at scale (``docs/at_scale.md``, the 1M-prompt case):
rank-0 scoring against scale-out scoring (:mod:`megatron_cropi.influence.scale_out`), by arithmetic."""

from __future__ import annotations

from megatron_cropi.cost import GPUS_PER_NODE, STORE_BYTES_PER_PROMPT_TOKEN, STORE_BYTES_PER_RESPONSE_TOKEN

__all__ = ["scale_out_footprint"]

# Under scale-out no rank keeps a per-row array in private memory: a complete trajectory store's index and
# selection columns (rollout/store_index.py) and the unit plan (influence/sharded_store.py) are files every
# rank maps: clean page cache, shared by a node's ranks, given back under pressure.
MAPPED_INDEX_BYTES_PER_ROW = 40       # index/ids.npy (32-byte ids), part.npy and row.npy (int32)
MAPPED_COLUMN_BYTES_PER_ROW = 12      # index/pass_rate.npy (float64), index/source.npy (int32)
MAPPED_PLAN_BYTES_PER_LIVE_ROW = 8    # plan_rows.npy (int64): the rows of each unit
PLANNING_BYTES_PER_ROW = 17 + 24      # global rank 0 while it plans, then freed: longest, tokens (int64),
                                      # zero-variance (bool); live rows and their plan order (int64 each)
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
    objects around them add more, so the rank-0 figure is a lower bound. Scale-out's private memory per
    rank (``per_rank_bytes``) is the one unit it scores plus the cosines of its share of the scored rows
    while it selects (``live / world`` rows); global rank 0 also holds the per-row planning arrays for
    a moment before scoring (``rank0_planning_bytes``). The index, columns and plan every rank maps
    (``mapped_bytes_per_node``) are page cache, once per node; so are the store pages a rank reads while it
    scores (not counted).

    Under scale-out a cropi selection is made and written where the cosines are (each rank writes its
    own picks): rank 0 receives a bounded number of counts (``rank0_receives_bytes``), whatever the pool
    and DP; every rank reads the pool's id, pass-rate and source columns (mapped) and the picks from disk.
    The policies that read every row's score meet the scored rows' cosines on rank 0
    (``rank0_receives_bytes_cosines_met``)."""
    dp = nodes * gpus_per_node // (tp * pp)
    world = nodes * gpus_per_node
    per_prompt = responses * mean_response_tokens * STORE_BYTES_PER_RESPONSE_TOKEN + prompt_tokens * STORE_BYTES_PER_PROMPT_TOKEN
    live = live_fraction * pool_prompts
    return {
        "pool_prompts": pool_prompts, "nodes": nodes, "dp": dp,
        "rank0_path": {"per_rank_rollouts_bytes": int(pool_prompts * per_prompt),
                       "rank0_receives_bytes": int(live * k * 4 * (dp - 1) / dp),
                       "rank0_writes_bytes": int(pool_prompts * k * feature_bytes)},
        "scale_out": {"per_rank_bytes": int(prompts_per_unit * per_prompt
                                            + live / world * (COSINE_BYTES_PER_ROW + 8 * directions)),
                      "rank0_planning_bytes": int(pool_prompts * PLANNING_BYTES_PER_ROW),
                      "mapped_bytes_per_node": int(pool_prompts * (MAPPED_INDEX_BYTES_PER_ROW
                                                                   + MAPPED_COLUMN_BYTES_PER_ROW)
                                                   + live * MAPPED_PLAN_BYTES_PER_LIVE_ROW),
                      "rank0_receives_bytes": TOP_M_COUNT_BYTES,
                      "rank0_receives_bytes_cosines_met": int(live * (COSINE_BYTES_PER_ROW + 8 * directions)),
                      "shard_bytes_per_replica": int(live * k * feature_bytes / dp)},
    }
