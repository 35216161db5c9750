"""The native Megatron sampler: its behaviour log-probs equal the training forward's (teacher-forced
Megatron forward + vocab-parallel log-probs on the packed micro-batch, fp32, 1e-4) at TP=1 and TP=2;
samples do not depend on TP, DP or batching; PP=2 is refused with a pointer to vLLM."""

import numpy as np
import pytest

from megatron_cropi.testing.spawn import run_ranks


def _teacher_forced(model, groups, rollout_groups, temperature, top_p):
    """Log-probs of the stored tokens from one full forward per micro-batch (the POPI/GRPO path)."""
    import torch

    from megatron_cropi.model.logprobs import vocab_parallel_logprobs
    from megatron_cropi.model.schedule import causal_attention_mask
    from megatron_cropi.popi.batch import pack_microbatches, sequence_length_for
    from megatron_cropi.rollout.native_sampler import gather_vocab
    from megatron_cropi.rollout.sampling import token_logprobs

    k = len(rollout_groups[0].responses)
    seq = sequence_length_for(rollout_groups)
    mbs = pack_microbatches(rollout_groups, list(range(len(rollout_groups))), prompts_per_microbatch=4,
                            responses_per_prompt=k, seq_length=seq)
    stored, computed = [], []
    with torch.no_grad():
        for mb in mbs:
            logits = model(input_ids=mb.tokens, position_ids=mb.position_ids,
                           attention_mask=causal_attention_mask(seq, groups.device))
            if top_p < 1.0:  # the trainer's vocab-parallel path has no top-p: use the full-vocabulary formula
                full = gather_vocab(logits.float().reshape(-1, logits.shape[-1]), groups).reshape(*logits.shape[:2], -1)
                lp = token_logprobs(full, mb.labels, temperature=temperature, top_p=top_p)
            else:
                lp = vocab_parallel_logprobs(logits, mb.labels, tp_group=groups.tp, tp_rank=groups.tp_rank,
                                             temperature=temperature if temperature > 0 else 1.0)
            m = mb.mask > 0
            stored.append(mb.behaviour_logprobs[m])
            computed.append(lp[m])
    return torch.cat(stored).numpy(), torch.cat(computed).numpy()


def _worker(tmp):
    import torch

    from megatron_cropi.data.char_tokenizer import CharTokenizer
    from megatron_cropi.data.prompt_ids import pool_hash
    from megatron_cropi.data.synthetic import build_synthetic_sets
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed
    from megatron_cropi.rewards import RewardConfig, RewardFunction
    from megatron_cropi.rollout.native_sampler import NativeSampler
    from megatron_cropi.rollout.runner import rollout_prompts
    from megatron_cropi.rollout.store import StoreHeader, TrajectoryStore
    from megatron_cropi.records import RolloutGroup, SamplingParams
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed()
    rank = torch.distributed.get_rank()
    cfg = tiny_model_config("cpu-default")
    tok = CharTokenizer()
    prompts = build_synthetic_sets(seed=5, per_family=2, val_size=2, test_size=2, check_per_family=0).pool[:24]
    settings = {"T0.7": SamplingParams(n=4, temperature=0.7, max_tokens=6, seed=11),
                "raw": SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=11, logprobs="raw"),
                "topp": SamplingParams(n=3, temperature=1.3, top_p=0.8, max_tokens=6, seed=2)}
    out = {}
    for tp in (2, 1):
        groups = build_parallel_groups(tp, 1)
        # std 0.5: a peaked random model, so EOS (and early stops) really happen
        model = build_tiny_model(cfg, groups, seed=4, std=0.5)
        sampler = NativeSampler(model, groups, stop_token_ids=[tok.eos_token_id], max_batch_sequences=96)
        for name, sp in settings.items():
            resp = sampler.generate(prompts, sp)
            rgs = [RolloutGroup(p, tuple(r), np.zeros(len(r), np.float32)) for p, r in zip(prompts, resp)]
            sampling = sp.logprobs == "sampling"
            stored, computed = _teacher_forced(model, groups, rgs, sp.temperature if sampling else 1.0,
                                               sp.top_p if sampling else 1.0)
            out[(tp, name)] = dict(tokens=[[r.token_ids.tolist() for r in g] for g in resp],
                                   finished=[[r.finished for r in g] for g in resp],
                                   err=float(np.abs(stored - computed).max()), n=len(stored))
        if tp == 1:
            # TP=1 on two ranks is DP=2: other chunking and prompt order change nothing, and the rollout
            # loop (rank 0 gathers both replicas' batches, scores and commits) stores exactly these samples
            sampler.max_batch_sequences = 7
            rev = sampler.generate(prompts[::-1], settings["T0.7"])[::-1]
            out["rev"] = [[r.token_ids.tolist() for r in g] for g in rev]
            sp = settings["T0.7"]
            header = StoreHeader.build(sp, tokenizer=tok.identity, model="random", policy_version=0,
                                       pool_hash=pool_hash(p.prompt_id for p in prompts), num_prompts=len(prompts))
            store = TrajectoryStore.open_for_append(f"{tmp}/dp2", header) if rank == 0 else None
            reward_fn = RewardFunction(RewardConfig(verifier="exact")) if rank == 0 else None
            summary = rollout_prompts(prompts, sampler, sp, store=store, tokenizer=tok, batch_prompts=5, groups=groups,
                                      progress=False, reward_fn=reward_fn)
            out["complete"], out["dp_size"] = summary.complete, groups.dp_size
        destroy_parallel_groups()
    groups = build_parallel_groups(1, 2)
    try:
        NativeSampler(build_tiny_model(cfg, groups), groups, stop_token_ids=[1])
    except ValueError as err:
        out["pp_error"] = str(err)
    return out if rank == 0 else None


@pytest.mark.timeout(240)
def test_native_sampler_logprobs_exact_across_tp_and_layouts(tmp_path):
    out = run_ranks(_worker, 2, args=(str(tmp_path),), timeout_s=220)[0]
    for tp in (1, 2):
        for name in ("T0.7", "raw", "topp"):
            r = out[(tp, name)]
            assert r["n"] > 200 and r["err"] <= 1e-4, (tp, name, r["err"])
        finished = [f for g in out[(tp, "T0.7")]["finished"] for f in g]
        assert 0 < sum(finished) < len(finished)  # both stopped and cut responses are covered
    for name in ("T0.7", "raw", "topp"):  # TP changes nothing: the same samples
        assert out[(1, name)]["tokens"] == out[(2, name)]["tokens"], name
    assert out[(1, "T0.7")]["tokens"] != out[(1, "topp")]["tokens"]
    assert out["rev"] == out[(1, "T0.7")]["tokens"]
    assert "PP=2" in out["pp_error"] and "vllm" in out["pp_error"]
    from megatron_cropi.rollout.store import TrajectoryStore

    store = TrajectoryStore.open(tmp_path / "dp2")
    assert out["dp_size"] == 2 and out["complete"] and store.complete and len(store) == 24
    order = {g: i for i, g in enumerate(store.prompt_ids())}
    assert sorted(order) == store.prompt_ids()
    tokens = out[(2, "T0.7")]["tokens"]
    from megatron_cropi.data.synthetic import build_synthetic_sets

    prompts = build_synthetic_sets(seed=5, per_family=2, val_size=2, test_size=2, check_per_family=0).pool[:24]
    for p, expected in zip(prompts, tokens):
        assert [r.token_ids.tolist() for r in store.get(p.prompt_id).responses] == expected
