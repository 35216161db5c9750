"""Length-aware micro-batches and the truncated backward under TP=2 and PP=2 (gloo, 2 ranks).

Under PP=2 (one layer per stage) the cases put the cut on the first stage (layer 0's MLP), at the
last stage's input with the first stage entirely below it (``last_layers: 1``: the first stage must
still receive a gradient to send back, or the schedule hangs), at the output layer, and nowhere (all
parameters; length buckets only). Each equals the padded, full-backward features of the same layout.
"""

import numpy as np
import pytest

from megatron_cropi.testing.spawn import run_ranks

SUBSETS = {"all": {}, "last1": {"last_layers": 1}, "layer0_mlp": {"include_params": [r"^decoder\.layers\.0\.mlp\."]},
           "output": {"include_params": [r"^output_layer\."]}}
LAYOUTS = [(1, 2), (2, 1)]
K = 4


def _worker():
    from megatron_cropi.influence.scorer import ScoringConfig, score_pool
    from megatron_cropi.influence.stores import MemoryFeatureSink
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed
    from megatron_cropi.projection.config import build_projector
    from megatron_cropi.records import PromptRecord, Response, RolloutGroup
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed()
    cfg = tiny_model_config()
    rng = np.random.default_rng(4)
    pool = []
    for i in range(7):
        prompt = PromptRecord(f"p{i}", rng.integers(1, cfg.vocab_size, int(rng.integers(3, 6))).astype(np.int32), "")
        resps = tuple(Response(rng.integers(1, cfg.vocab_size, t).astype(np.int32),
                               (-rng.uniform(2, 4, t)).astype(np.float32))
                      for t in np.minimum(1 + rng.geometric(0.3, K), 20))
        pool.append(RolloutGroup(prompt, resps, rng.permutation([1, 0, 0, 1]).astype(np.float32)))
    projector = build_projector(kind="dense", k=40, seed=1)
    out = {}
    for tp, pp in LAYOUTS:
        groups = build_parallel_groups(tp, pp)
        model = build_tiny_model(cfg, groups, seed=6)
        for mode in ("batched", "per_prompt"):
            for name, subset in SUBSETS.items():
                for cheap in (False, True):
                    extra = dict(max_tokens_per_microbatch=K * 2 * 12, length_multiple=4, truncate_backward=True)
                    sc = ScoringConfig(mode=mode, prompts_per_microbatch=2, microbatches_per_call=2, **subset,
                                       **(extra if cheap else {}))
                    sink = MemoryFeatureSink(len(pool), projector.k)
                    seen = []
                    handle = model.decoder.layers[0].register_forward_hook(
                        lambda m, a, o: seen.append(o[0].requires_grad))
                    score_pool(pool, sink, model=model, groups=groups, projector=projector, cfg=sc, temperature=1.0,
                               responses_per_prompt=K, progress=False)
                    handle.remove()
                    if pp == 2 and groups.pp_rank == 0 and name == "last1" and cheap:
                        assert seen and not any(seen), "the first stage, below the cut, still ran a backward"
                    out[(tp, pp, mode, name, cheap)] = (sink.features.copy(), sink.status.copy())
            assert all(p.requires_grad and p.grad is None for p in model.parameters())
        destroy_parallel_groups()
    return out


@pytest.mark.timeout(300)
def test_bucketed_truncated_scoring_equals_padded_full_scoring_tp2_pp2():
    results = run_ranks(_worker, 2, timeout_s=280)[0]
    for tp, pp in LAYOUTS:
        for mode in ("batched", "per_prompt"):
            for name in SUBSETS:
                ref, st_ref = results[(tp, pp, mode, name, False)]
                got, st_got = results[(tp, pp, mode, name, True)]
                assert np.array_equal(st_ref, st_got) and (st_ref == 1).all(), (tp, pp, mode, name)
                err = (np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)).max()
                assert err < 1e-5, f"TP={tp} PP={pp} {mode} {name}: relative error {err:.2e}"
