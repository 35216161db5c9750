"""GRPO on CUDA (NCCL, one GPU per rank): the same trainer in bf16 with fp32 gradient reduction and the
distributed optimizer's fp32 main parameters; the reward of the easy task rises, and a checkpoint
round-trips exactly. Runs on every available GPU count ≥ 1 (TP=2 when there are two)."""

import pytest
import torch

from megatron_cropi.testing.spawn import run_ranks

pytestmark = pytest.mark.gpu

GRPO = {"steps": 12, "prompts_per_step": 16, "micro_batch_prompts": 8,
        "loss": {"kl_coef": 0.001, "entropy_coef": 0.0}, "optim": {"lr": 3e-3, "weight_decay": 0.0}}


def _gpu_worker(tp, ckpt_dir):
    import torch.distributed as dist

    from megatron_cropi.testing.grpo_tiny import build_tiny_trainer, easy_prompts
    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.parallel import build_parallel_groups, init_distributed

    assert init_distributed() == "nccl"
    g = build_parallel_groups(tp, 1)
    assert g.device.type == "cuda"
    model = {"vocab_size": 32, "params_dtype": "bfloat16"}
    trainer = build_tiny_trainer(g, GRPO, model=model, prompts=easy_prompts(8), checkpoint_dir=ckpt_dir)
    assert next(trainer.model.parameters()).is_cuda
    history = [trainer.step()["reward"] for _ in range(GRPO["steps"])]
    path = trainer.save()
    saved = assemble_global_tensors(trainer.model, g, attr="data", dst=0)
    again = build_tiny_trainer(g, GRPO, model=model, prompts=easy_prompts(8), checkpoint_dir=ckpt_dir)
    again.load(path)
    loaded = assemble_global_tensors(again.model, g, attr="data", dst=0)
    m = again.step()  # the resumed trainer trains (optimizer state loaded into fp32 main params)
    if dist.get_rank() != 0:
        return None
    return history, max((saved[n] - loaded[n]).abs().max().item() for n in saved), m["updates"] + m["skipped"]


def test_grpo_learns_on_cuda_in_bf16(tmp_path):
    tp = 2 if torch.cuda.device_count() >= 2 else 1
    history, load_err, stepped = run_ranks(_gpu_worker, tp, args=(tp, str(tmp_path / "ckpt")), timeout_s=600)[0]
    assert sum(history[-3:]) / 3 >= sum(history[:3]) / 3 + 0.25, history
    assert load_err == 0.0
    assert stepped == 1.0  # the resumed trainer took its step (an update, or a skip when all groups agree)
