"""Checkpoints of a GRPO run (2 ranks, DP=2, distributed optimizer):

* killed (SIGKILL) right after the checkpoint of step n, then resumed: parameters after N steps equal
  an uninterrupted run's (fp32, exactly up to float noise), metrics too;
* a leftover temporary directory of an interrupted save is ignored;
* the checkpoint loads into TP=2 and into PP=2 layouts (weights by global name; optimizer state too);
* a checkpoint of another model shape is refused with an error naming what differs.
"""

import os
import signal

import pytest

from megatron_cropi.testing.spawn import RankFailure, run_ranks

N_KILL, N_TOTAL = 2, 4
GRPO = {
    "steps": N_TOTAL, "prompts_per_step": 8, "micro_batch_prompts": 4,
    "loss": {"kl_coef": 0.01, "entropy_coef": 0.001},
    "optim": {"lr": 3e-3, "lr_warmup_steps": 2, "lr_decay_style": "cosine", "weight_decay": 0.01},
    "checkpoint": {"save_interval": N_KILL, "keep_last": 1},
}


def _trainer(g, ckpt_dir, *, save=True, **model):
    from megatron_cropi.testing.grpo_tiny import build_tiny_trainer, easy_prompts

    grpo = GRPO if save else {**GRPO, "checkpoint": {"save_interval": 0}}
    return build_tiny_trainer(g, grpo, prompts=easy_prompts(2), checkpoint_dir=ckpt_dir,
                              model={"vocab_size": 32, **model} if model else None)


def _killed_run(ckpt_dir):
    from megatron_cropi.parallel import build_parallel_groups, init_distributed

    init_distributed()
    trainer = _trainer(build_parallel_groups(1, 1), ckpt_dir)
    for _ in range(N_KILL):
        trainer.step()  # the step-n checkpoint is written inside step n (save_interval)
    os.kill(os.getpid(), signal.SIGKILL)  # injected fault: the process dies without any cleanup


def _resume_and_compare(ckpt_dir):
    import torch.distributed as dist

    from megatron_cropi.checkpoint.dist_ckpt import CheckpointError, latest_checkpoint
    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed

    init_distributed()
    out = {}
    g = build_parallel_groups(1, 1)
    ref = _trainer(g, ckpt_dir, save=False)  # the uninterrupted run
    ref_metrics = [ref.step() for _ in range(N_KILL)]
    out["at_n"] = assemble_global_tensors(ref.model, g, attr="data", dst=0)
    ref_metrics += [ref.step() for _ in range(N_TOTAL - N_KILL)]
    out["ref"] = assemble_global_tensors(ref.model, g, attr="data", dst=0)
    destroy_parallel_groups()

    g = build_parallel_groups(1, 1)
    resumed = _trainer(g, ckpt_dir, save=False)
    latest = latest_checkpoint(ckpt_dir)
    meta = resumed.load(latest)
    out["resumed_from"] = (latest.name, meta["step"], resumed.state_dict()["data"]["index"])
    metrics = [resumed.step() for _ in range(N_TOTAL - N_KILL)]
    out["resumed"] = assemble_global_tensors(resumed.model, g, attr="data", dst=0)
    out["metrics"] = [(a["reward"], b["reward"], a["kl"], b["kl"], a["lr"], b["lr"])
                      for a, b in zip(ref_metrics[N_KILL:], metrics)]
    destroy_parallel_groups()

    for tp, pp in [(2, 1), (1, 2)]:
        g = build_parallel_groups(tp, pp)
        other = _trainer(g, ckpt_dir, save=False)
        other.load(latest)  # weights + reshardable optimizer state + data position
        out[(tp, pp)] = (assemble_global_tensors(other.model, g, attr="data", dst=0), other.scheduler.num_steps,
                         other.state_dict()["step"])
        destroy_parallel_groups()

    g = build_parallel_groups(1, 1)
    wrong = _trainer(g, ckpt_dir, save=False, transformer={"hidden_size": 32, "ffn_hidden_size": 64})
    try:
        wrong.load(latest)
        out["wrong_shape"] = "loaded without error"
    except CheckpointError as err:
        out["wrong_shape"] = str(err)
    destroy_parallel_groups()
    return out if dist.get_rank() == 0 else None


@pytest.mark.timeout(300)
def test_kill_and_resume_equals_uninterrupted_and_reshards(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(RankFailure, match="exit code -9"):
        run_ranks(_killed_run, 2, args=(ckpt,), timeout_s=200)
    names = sorted(os.listdir(ckpt))
    assert names == [f"step_{N_KILL:08d}"], names
    os.makedirs(os.path.join(ckpt, f".tmp-step_{N_TOTAL:08d}-deadbeef", "dist"))  # an interrupted later save

    out = run_ranks(_resume_and_compare, 2, args=(ckpt,), timeout_s=280)[0]
    assert out["resumed_from"][:2] == (f"step_{N_KILL:08d}", N_KILL)
    assert out["resumed_from"][2] > 0  # the data position came back too
    for name, want in out["ref"].items():
        err = (out["resumed"][name] - want).abs().max().item()
        assert err <= 1e-6, f"{name}: resumed run differs from the uninterrupted one by {err:.3e}"
    for r_ref, r_res, kl_ref, kl_res, lr_ref, lr_res in out["metrics"]:
        assert r_ref == r_res and kl_res == pytest.approx(kl_ref, abs=1e-6) and lr_res == lr_ref
    # the weights moved between step n and N: the equality above is not vacuous
    assert max((out["ref"][n] - out["at_n"][n]).abs().max().item() for n in out["ref"]) > 1e-3
    for layout in [(2, 1), (1, 2)]:
        params, sched_steps, step = out[layout]
        assert step == N_KILL and sched_steps == N_KILL
        for name, want in out["at_n"].items():
            # == the uninterrupted run's step-n weights (the killed run was the same run up to step n)
            assert (params[name] - want).abs().max().item() <= 1e-6, f"{layout} {name}"
    msg = out["wrong_shape"]
    assert "another model shape" in msg and "hidden_size: checkpoint 64 vs model 32" in msg, msg
    assert "has shape (256, 64) in the checkpoint, (128, 32) in the model" in msg, msg
