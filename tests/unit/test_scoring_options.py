"""Cheaper scoring, same features: length-aware micro-batches and a truncated backward (one process)."""

import numpy as np
import pytest

from megatron_cropi.config.loader import ConfigError, from_dict
from megatron_cropi.influence.scorer import ScoringConfig, last_layers_patterns, score_pool, scored_layouts
from megatron_cropi.influence.stores import MemoryFeatureSink
from megatron_cropi.popi.buckets import length_bucketed_calls, padded_tokens, uniform_calls
from megatron_cropi.records import PromptRecord, Response, RolloutGroup

K, KDIM, LAYERS = 4, 48, 3


@pytest.fixture(scope="module")
def tiny():
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed(allow_single=True)
    groups = build_parallel_groups(1, 1)
    cfg = tiny_model_config(transformer={"num_layers": LAYERS})
    return build_tiny_model(cfg, groups, seed=3), groups, cfg


def _pool(vocab, n=12, seed=0):
    """Prompts of 3-6 tokens, responses of 1-30 (long tail), every 4th prompt without reward variance."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = PromptRecord(f"q{i:03d}", rng.integers(1, vocab, int(rng.integers(3, 7))).astype(np.int32), answer="")
        lens = np.minimum(1 + rng.geometric(0.25, K), 30)
        resps = tuple(Response(rng.integers(1, vocab, t).astype(np.int32), (-rng.uniform(2, 4, t)).astype(np.float32))
                      for t in lens)
        rewards = np.ones(K, np.float32) if i % 4 == 3 else rng.permutation([1, 0, 1, 0]).astype(np.float32)
        out.append(RolloutGroup(prompt, resps, rewards))
    return out


def _projector():
    from megatron_cropi.projection.config import build_projector

    return build_projector(kind="dense", k=KDIM, seed=0)


def _features(tiny, pool, **cfg):
    model, groups, _ = tiny
    sink = MemoryFeatureSink(len(pool), KDIM)
    stats = score_pool(pool, sink, model=model, groups=groups, projector=_projector(),
                       cfg=ScoringConfig(**{"prompts_per_microbatch": 3, "microbatches_per_call": 2, **cfg}),
                       temperature=1.0, responses_per_prompt=K, progress=False)
    return sink.features, sink.status, stats


def _close(a, b, tol=1e-5):
    live = np.abs(b).sum(1) > 0
    err = np.linalg.norm(a[live] - b[live], axis=1) / np.linalg.norm(b[live], axis=1)
    assert live.sum() > 0 and err.max() < tol, err.max()
    assert np.array_equal(a[~live], b[~live])


def test_length_bucketed_plan_covers_every_prompt_once_within_budget():
    rng = np.random.default_rng(1)
    lengths = np.minimum(8 + rng.geometric(1 / 24, 500), 200)
    calls = length_bucketed_calls(lengths, responses_per_prompt=8, max_tokens=4096, max_prompts=16,
                                  microbatches_per_call=3, multiple=8, cap=int(lengths.max()))
    seen = np.concatenate([c.indices for c in calls])
    assert np.array_equal(np.sort(seen), np.arange(500))
    assert [c.seq_length for c in calls] == sorted(c.seq_length for c in calls)
    for c in calls:
        assert (lengths[c.indices] <= c.seq_length).all() and c.num_microbatches <= 3
        assert c.seq_length % 8 == 0 or c.seq_length == lengths.max()
        assert 1 <= c.prompts_per_microbatch <= 16
        assert c.prompts_per_microbatch * 8 * c.seq_length <= max(4096, 8 * c.seq_length)
    uniform = uniform_calls(500, prompts_per_call=48, seq_length=int(lengths.max()), prompts_per_microbatch=16)
    assert sum(padded_tokens(c, 8) for c in calls) < 0.5 * sum(padded_tokens(c, 8) for c in uniform)


@pytest.mark.parametrize("mode", ["batched", "per_prompt"])
def test_length_bucketed_scoring_equals_padded_scoring(tiny, mode):
    pool = _pool(tiny[2].vocab_size)
    padded, st_p, stats_p = _features(tiny, pool, mode=mode)
    bucketed, st_b, stats_b = _features(tiny, pool, mode=mode, max_tokens_per_microbatch=K * 2 * 16,
                                        length_multiple=4)
    assert np.array_equal(st_p, st_b)
    _close(bucketed, padded)
    assert stats_b.tokens == stats_p.tokens > 0
    assert stats_b.padded_tokens < stats_p.padded_tokens
    assert 0 <= stats_b.padding_fraction < stats_p.padding_fraction


def test_last_layers_patterns_select_the_top_of_the_model(tiny):
    model, groups, _ = tiny
    names = {l.global_name for l in scored_layouts(model, groups, ScoringConfig(last_layers=1)).values()}
    assert names and all(n.startswith(("decoder.layers.2.", "decoder.final_layernorm.", "output_layer."))
                         for n in names)
    assert "output_layer.weight" in names and "decoder.final_layernorm.weight" in names
    assert last_layers_patterns(4, 2)[0] == r"^decoder\.layers\.(2|3)\."
    with pytest.raises(ConfigError, match="last_layers"):
        scored_layouts(model, groups, ScoringConfig(last_layers=LAYERS + 1))


def test_scoring_option_keys_are_validated():
    with pytest.raises(ConfigError, match="last_layers"):
        from_dict(ScoringConfig, {"last_layers": 1, "include_params": ["mlp"]})
    with pytest.raises(ConfigError, match="max_tokens_per_microbatch"):
        from_dict(ScoringConfig, {"max_tokens_per_microbatch": -1})
    with pytest.raises(ConfigError, match="length_multiple"):
        from_dict(ScoringConfig, {"length_multiple": 0})
    cfg = from_dict(ScoringConfig, {"truncate_backward": True, "last_layers": 2, "max_tokens_per_microbatch": 4096})
    assert cfg.truncate_backward and cfg.last_layers == 2 and cfg.length_multiple == 8


@pytest.mark.parametrize("mode", ["batched", "per_prompt"])
@pytest.mark.parametrize("subset, below", [({"last_layers": 1}, LAYERS - 2),
                                           ({"include_params": [r"decoder\.layers\.1\.mlp"]}, 0),
                                           ({"last_layers": LAYERS}, None)])
def test_truncated_backward_equals_full_backward(tiny, mode, subset, below):
    model = tiny[0]
    pool = _pool(tiny[2].vocab_size, n=6, seed=2)
    full, _, _ = _features(tiny, pool, mode=mode, **subset)
    seen = []
    watched = model.embedding if below is None else model.decoder.layers[below]
    handle = watched.register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).requires_grad))
    try:
        cut, _, _ = _features(tiny, pool, mode=mode, truncate_backward=True, **subset)
    finally:
        handle.remove()
    _close(cut, full)
    assert seen and not any(seen)  # nothing below the lowest scored layer is on the backward's path
    assert all(p.requires_grad for p in model.parameters())


def test_truncation_with_the_embedding_scored_changes_nothing(tiny):
    pool = _pool(tiny[2].vocab_size, n=4, seed=3)
    full, _, _ = _features(tiny, pool)
    same, _, _ = _features(tiny, pool, truncate_backward=True)
    assert np.array_equal(full, same)


def test_memory_estimate_follows_the_token_budget():
    from megatron_cropi.memory import estimate_memory
    from megatron_cropi.run_config import RunConfig

    def scoring_bytes(**scoring):
        cfg = from_dict(RunConfig, {
            "model": {"preset": "custom", "vocab_size": 64, "max_sequence_length": 256, "tie_word_embeddings": False,
                      "rotary_base": 10000.0, "transformer": {"num_layers": 2, "hidden_size": 32,
                                                              "num_attention_heads": 2, "ffn_hidden_size": 64}},
            "scoring": {"seq_length": 128, "prompts_per_microbatch": 8, **scoring},
            "curriculum": {"pool_samples": 4, "target_samples": 4}})
        est = estimate_memory(cfg, dp=1, overhead_gib=0.0)
        return est["assumptions"]["scoring_micro_batch_sequences"], sum(est["stages"][0]["scoring_gib"].values())

    base_b, base = scoring_bytes()
    assert scoring_bytes(max_tokens_per_microbatch=8 * 4 * 128) == (base_b, base) == (32, base)
    small_b, small = scoring_bytes(max_tokens_per_microbatch=1024)
    assert small_b == 8 and small < base
    assert scoring_bytes(max_tokens_per_microbatch=1)[0] == 4  # one prompt at least


def test_last_layers_beyond_the_model_is_refused_when_the_config_loads():
    from megatron_cropi.run_config import RunConfig

    with pytest.raises(ConfigError, match="scoring.last_layers"):
        from_dict(RunConfig, {"model": {"preset": "tiny"}, "scoring": {"last_layers": 3}})
    assert from_dict(RunConfig, {"model": {"preset": "tiny"}, "scoring": {"last_layers": 2}}).scoring.last_layers == 2
