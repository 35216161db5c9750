"""Scoring a pool into a feature store: exclusion, flags, resume, header checks, θ = β (one process)."""

import dataclasses

import numpy as np
import pytest
import torch

from megatron_cropi.influence.feature_store import DONE, EXCLUDED, FLAGGED, PENDING, FeatureHeader, FeatureStore, \
    FeatureStoreMismatch
from megatron_cropi.influence.scorer import ScoringConfig, score_pool
from megatron_cropi.records import PromptRecord, Response, RolloutGroup

K, KDIM = 4, 32


@pytest.fixture(scope="module")
def tiny():
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed(allow_single=True)
    groups = build_parallel_groups(1, 1)
    cfg = tiny_model_config()
    return build_tiny_model(cfg, groups, seed=2), groups, cfg


def _pool(vocab, n=10, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = PromptRecord(f"id{i:03d}", rng.integers(1, vocab, 4).astype(np.int32), answer="")
        resps = tuple(Response(rng.integers(1, vocab, 3).astype(np.int32), (-rng.uniform(3, 5, 3)).astype(np.float32))
                      for _ in range(K))
        rewards = np.array([1, 0, 1, 0], np.float32) if i % 3 else np.ones(K, np.float32)  # every 3rd: zero variance
        out.append(RolloutGroup(prompt, resps, rewards))
    return out


def _store(path, n):
    return FeatureStore.open(path, FeatureHeader(num_rows=n, k=KDIM, seed=0, projector="dense", param_set_hash="h",
                                                 checkpoint_step=0, prompt_id_hash="p"))


def _projector():
    from megatron_cropi.projection.config import build_projector

    return build_projector(kind="dense", k=KDIM, seed=0)


def _score(tiny, pool, store, **kw):
    model, groups, _ = tiny
    cfg = ScoringConfig(prompts_per_microbatch=2, microbatches_per_call=1, seq_length=8)
    return score_pool(pool, store, model=model, groups=groups, projector=_projector(), cfg=cfg, temperature=1.0,
                      responses_per_prompt=K, progress=False, **kw)


def test_zero_variance_excluded_and_resume_is_bit_identical(tiny, tmp_path):
    pool = _pool(tiny[2].vocab_size)
    full = _store(tmp_path / "full", len(pool))
    stats = _score(tiny, pool, full)
    st = full.statuses()
    zero_var = np.array([g.zero_variance for g in pool])
    assert stats.excluded == zero_var.sum() == 4
    assert (st[zero_var] == EXCLUDED).all() and (st[~zero_var] == DONE).all()
    assert np.all(full.matrix()[zero_var] == 0.0)
    assert np.all(np.abs(full.matrix()[~zero_var]).sum(1) > 0)

    part = _store(tmp_path / "part", len(pool))
    _score(tiny, pool, part, max_chunks=1)  # "killed" after one chunk
    assert (part.statuses() == PENDING).sum() > 0
    reopened = _store(tmp_path / "part", len(pool))
    stats2 = _score(tiny, pool, reopened)
    assert stats2.skipped_done == 2  # the finished chunk was not recomputed
    assert np.array_equal(reopened.matrix(), full.matrix())
    assert np.array_equal(reopened.statuses(), full.statuses())


def test_nan_and_inf_flag_the_prompt_and_the_run_goes_on(tiny, tmp_path):
    pool = _pool(tiny[2].vocab_size)
    clean = _store(tmp_path / "clean", len(pool))
    _score(tiny, pool, clean)
    bad = list(pool)
    r1 = bad[1].responses[0]
    lps = r1.logprobs.copy()
    lps[0] = np.nan  # corrupt behaviour log-prob
    bad[1] = dataclasses.replace(bad[1], responses=(Response(r1.token_ids, lps),) + bad[1].responses[1:])
    r2 = bad[2].responses[1]
    huge = np.full_like(r2.logprobs, -200.0)  # ratio e^200 overflows: infinite loss/gradient
    bad[2] = dataclasses.replace(bad[2], responses=bad[2].responses[:1] + (Response(r2.token_ids, huge),)
                                 + bad[2].responses[2:])
    store = _store(tmp_path / "bad", len(pool))
    stats = _score(tiny, bad, store)
    st = store.statuses()
    assert st[1] == FLAGGED and st[2] == FLAGGED and stats.flagged == 2
    assert np.all(store.matrix()[[1, 2]] == 0)
    others = [i for i in range(len(pool)) if i not in (1, 2)]
    assert np.allclose(store.matrix()[others], clean.matrix()[others], rtol=1e-5, atol=1e-6)


def test_header_mismatch_names_field_and_both_values(tmp_path):
    _store(tmp_path / "s", 5)
    with pytest.raises(FeatureStoreMismatch) as info:
        FeatureStore.open(tmp_path / "s", FeatureHeader(num_rows=5, k=KDIM, seed=0, projector="dense",
                                                         param_set_hash="h", checkpoint_step=7, prompt_id_hash="p"))
    assert "checkpoint_step=0" in str(info.value) and "checkpoint_step=7" in str(info.value)
    (tmp_path / "s" / "features.f32").write_bytes(b"short")
    with pytest.raises(FeatureStoreMismatch, match="damaged"):
        _store(tmp_path / "s", 5)


def test_theta_equals_beta_sketch_is_projected_grpo_gradient(tiny):
    """With behaviour log-probs from the model itself, the captured sketch is P·∇(on-policy GRPO)."""
    from megatron_cropi.model.logprobs import vocab_parallel_logprobs
    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.model.schedule import causal_attention_mask
    from megatron_cropi.popi.batch import pack_microbatches
    from megatron_cropi.popi.capture import PopiCapture
    from megatron_cropi.projection.base import ShardSpec

    model, groups, cfg = tiny
    group = _pool(cfg.vocab_size)[1]
    mb = pack_microbatches([group], [0], prompts_per_microbatch=1, responses_per_prompt=K, seq_length=8)[0]
    mask = causal_attention_mask(8, groups.device)
    with torch.no_grad():
        lp = vocab_parallel_logprobs(model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=mask),
                                     mb.labels)
    resps = tuple(Response(r.token_ids, lp[i, 3:3 + len(r.token_ids)].numpy()) for i, r in enumerate(group.responses))
    on_policy = dataclasses.replace(group, responses=resps)
    mb = pack_microbatches([on_policy], [0], prompts_per_microbatch=1, responses_per_prompt=K, seq_length=8)[0]
    projector = _projector()
    sketch = PopiCapture(model, groups, projector, mode="batched").run([mb], 1, K).sketches[0]

    model.zero_grad()
    # independent oracle: token log-probs by plain log-softmax (TP = 1: the full vocabulary, T = 1), GRPO
    # advantages by hand, A_k = (r_k − mean r) / (std r + ε), std with Bessel correction (K − 1), ε = 1e-4
    logits = model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=mask).float()
    assert logits.shape[-1] == cfg.vocab_size
    logp = torch.log_softmax(logits, -1).gather(-1, mb.labels[..., None])[..., 0]
    assert mb.group_index.tolist() == [0] * K and mb.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
    r = mb.rewards.double()
    adv = ((r - r.mean()) / (torch.sqrt(((r - r.mean()) ** 2).sum() / (K - 1)) + 1e-4)).float()
    a = 0.5 / (np.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(adv, torch.tensor([a, -a, a, -a], dtype=torch.float32), atol=1e-6)
    grpo = -((adv[:, None] * logp * mb.mask).sum(-1) / mb.mask.sum(-1)).mean()
    grpo.backward()
    full = assemble_global_tensors(model, groups)
    expect = sum(projector.project(v[None], ShardSpec.whole(n, v.shape))[0] for n, v in full.items())
    model.zero_grad()
    assert expect.norm() > 0
    assert ((sketch - expect).norm() / expect.norm()).item() < 1e-5


def test_per_prompt_capture_inside_megatron_ddp(tiny):
    """cropi run scores the DDP-wrapped policy: per-prompt capture there equals batched capture, and
    DDP's gradient buffers stay untouched."""
    from megatron_cropi.config.loader import from_dict
    from megatron_cropi.grpo.config import OptimConfig
    from megatron_cropi.grpo.optimizer import wrap_ddp
    from megatron_cropi.parallel import build_parallel_groups
    from megatron_cropi.popi.batch import pack_microbatches
    from megatron_cropi.popi.capture import PopiCapture
    from megatron_cropi.testing.tiny import build_tiny_model

    _, _, cfg = tiny
    groups = build_parallel_groups(1, 1)
    model = build_tiny_model(cfg, groups, seed=4)
    pool = [g for g in _pool(cfg.vocab_size) if not g.zero_variance][:3]
    mbs1 = pack_microbatches(pool, list(range(3)), prompts_per_microbatch=1, responses_per_prompt=K, seq_length=8)
    mbs3 = pack_microbatches(pool, list(range(3)), prompts_per_microbatch=3, responses_per_prompt=K, seq_length=8)
    ref = PopiCapture(model, groups, _projector(), mode="batched").run(mbs3, 3, K).sketches
    ddp = wrap_ddp(model, groups, from_dict(OptimConfig, {"lr": 1e-4}))
    got = PopiCapture(model, groups, _projector(), mode="per_prompt").run(mbs1, 3, K).sketches
    assert ((got - ref).norm(dim=1) / ref.norm(dim=1)).max() < 1e-5
    assert all(float(p.main_grad.abs().max()) == 0.0 for p in model.parameters() if hasattr(p, "main_grad"))
    assert ddp is not None


def test_max_responses_per_prompt_scores_the_first_responses_only(tiny, tmp_path):
    """``scoring.max_responses_per_prompt: 2`` on a stored pool of K = 4 equals scoring, by hand, groups
    cut to their first two responses; prompts whose first two rewards are equal become excluded."""
    from megatron_cropi.data.prompt_ids import pool_hash
    from megatron_cropi.influence.stores import PolicyScorer, score_store
    from megatron_cropi.records import SamplingParams
    from megatron_cropi.rollout.store import StoreHeader, TrajectoryStore

    model, groups, mcfg = tiny
    pool = sorted(_pool(mcfg.vocab_size), key=lambda g: g.prompt_id)
    # mixed rewards in the first two responses for even rows, equal ones for odd rows
    pool = [dataclasses.replace(g, rewards=np.array([1, 0, 1, 0] if i % 2 == 0 else [1, 1, 0, 1], np.float32))
            for i, g in enumerate(pool)]
    header = StoreHeader.build(SamplingParams(n=K, temperature=1.0), tokenizer="t", model="m", policy_version=0,
                               num_prompts=len(pool), engine="native", pool_hash=pool_hash(g.prompt_id for g in pool))
    store = TrajectoryStore.open_for_append(tmp_path / "rollouts", header)
    store.append(pool)
    store.mark_complete()

    cfg = ScoringConfig(prompts_per_microbatch=2, microbatches_per_call=1, seq_length=8, max_responses_per_prompt=2)
    scorer = PolicyScorer(model, groups, _projector(), cfg, projection_seed=0, checkpoint_step=0, pad_id=0)
    stats = score_store(tmp_path / "rollouts", tmp_path / "features", scorer)
    got = FeatureStore.load(tmp_path / "features")
    assert got.header.responses_per_prompt == 2 and stats.excluded == len(pool) // 2

    cut = [dataclasses.replace(g, responses=g.responses[:2], rewards=g.rewards[:2]) for g in pool]
    want = _store(tmp_path / "by_hand", len(cut))
    score_pool(cut, want, model=model, groups=groups, projector=_projector(), cfg=cfg, temperature=1.0,
               responses_per_prompt=2, progress=False)
    assert np.array_equal(got.statuses(), want.statuses())
    assert np.allclose(got.matrix(), want.matrix(), rtol=1e-6, atol=1e-7)
    assert (got.statuses()[1::2] == EXCLUDED).all() and (got.statuses()[::2] == DONE).all()
