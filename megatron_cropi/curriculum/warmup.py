"""Supervised warm-up of a from-scratch policy on the synthetic suite: the CPU default's β.

A tiny model must be partly competent before RL has anything to improve. Each step draws fresh
random prompts from every family (never the val or test prompts) and minimises the cross-entropy of
the answer and ``<eos>``, through Megatron's schedule with megatron-core's DDP and AdamW. Warm-up
accuracy has a sharp phase transition (0 → 0.27 → 0.61 greedy on the target family between 1250, 1500
and 1750 steps in the calibration), so it stops adaptively: every ``eval_every`` steps it measures
greedy accuracy on the target-gradient set and stops at ``stop_at_greedy``. The result is written as
an HF-format directory (readable by the native sampler, vLLM and transformers).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from megatron_cropi.parallel import ParallelGroups

__all__ = ["run_warmup"]


def run_warmup(cfg, groups: ParallelGroups, tokenizer, prompts, out_dir: str | Path, *, metrics=None, log=print) -> dict:
    """Train a fresh policy until its greedy target accuracy reaches the threshold; save it as HF.

    Args:
        cfg: the run config (``curriculum.warmup``, ``data.synthetic``, ``model``).
        prompts: the run's :class:`~megatron_cropi.wiring.PromptSets`.
        out_dir: the HF directory to write (atomically).

    Returns:
        ``{"steps", "greedy_val", "seconds", "history"}``.
    """
    from megatron_cropi.checkpoint import save_model_as_hf
    from megatron_cropi.curriculum.evaluate import evaluate_accuracy
    from megatron_cropi.wiring import build_policy_model
    from megatron_cropi.data.synthetic import supervised_batches
    from megatron_cropi.grpo.config import OptimConfig
    from megatron_cropi.grpo.optimizer import build_optimizer, dp_loss_scale, wrap_ddp
    from megatron_cropi.grpo.rollouts import RolloutCollector, make_rewarder
    from megatron_cropi.model.logprobs import vocab_parallel_logprobs
    from megatron_cropi.model.schedule import causal_attention_mask, forward_backward, scale_for_schedule
    from megatron_cropi.rewards.base import RewardFunction
    from megatron_cropi.rewards.config import reward_config_for
    from megatron_cropi.rollout.native_sampler import NativeSampler

    wcfg = cfg.curriculum.warmup
    if cfg.data.kind != "synthetic":
        raise ValueError("curriculum.warmup needs data.kind: synthetic (real models arrive instruction-tuned; "
                         "set curriculum.warmup.enabled: false)")
    t0 = time.perf_counter()
    model = build_policy_model(cfg, groups)
    ocfg = OptimConfig(lr=wcfg.lr, clip_grad=1.0, use_distributed_optimizer=False, lr_decay_style="constant")
    ddp = wrap_ddp(model, groups, ocfg)
    optimizer, _ = build_optimizer(ddp, groups, ocfg, total_steps=wcfg.max_steps)
    sampler = NativeSampler(model, groups, stop_token_ids=[tokenizer.eos_token_id],
                            kv_cache=cfg.rollout.native.kv_cache)
    reward_fn = RewardFunction(reward_config_for(cfg.rollout.reward, cfg.data.kind))
    collector = RolloutCollector(sampler, make_rewarder(reward_fn, tokenizer), groups)
    sampling = cfg.rollout.sampling_params(cfg.run.seed)
    val = [p for recs in prompts.targets.values() for p in recs]
    exclude = {p.prompt_id for p in val} | {p.prompt_id for p in prompts.test}
    # every DP rank draws its own batches (seeded by its rank) so replicas see different data
    batches = supervised_batches(seed=cfg.data.synthetic.seed * 1009 + cfg.run.seed + 7919 * groups.dp_rank,
                                 batch_size=wcfg.batch_size // groups.dp_size or 1, exclude_ids=exclude,
                                 tokenizer=tokenizer)
    scale = dp_loss_scale(groups)
    history, step, greedy = [], 0, 0.0
    try:
        while step < wcfg.max_steps:
            batch = {k: torch.from_numpy(v) for k, v in next(batches).items()}
            seq = batch["tokens"].shape[1]
            mask = causal_attention_mask(seq, groups.device)
            pos = torch.arange(seq).unsqueeze(0).expand_as(batch["tokens"])
            denom = float(batch["loss_mask"].sum()) * groups.dp_size

            def forward_step(data_iterator, m, batch=batch, pos=pos, mask=mask, denom=denom):
                d = next(data_iterator)
                out = m(input_ids=d["tokens"].to(groups.device), position_ids=pos.to(groups.device),
                        attention_mask=mask)

                def loss_func(logits):
                    lp = vocab_parallel_logprobs(logits, d["labels"].to(groups.device), tp_group=groups.tp,
                                                 tp_rank=groups.tp_rank)
                    loss = -(lp * d["loss_mask"].to(groups.device)).sum() / denom
                    return scale_for_schedule(loss * scale, 1), {"loss": loss.detach().clone() * groups.dp_size}

                return out, loss_func

            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            reduced = forward_backward(ddp, groups, forward_step_func=forward_step, data_iterator=iter([batch]),
                                       num_microbatches=1, seq_length=seq, micro_batch_size=batch["tokens"].shape[0])
            optimizer.step()
            step += 1
            if step % wcfg.eval_every == 0 or step == wcfg.max_steps:
                res = evaluate_accuracy(collector, groups, val, sampling, samples=1, temperature=0.0,
                                        seed=cfg.run.seed, max_prompts=0)
                greedy = res["pass_rate"]
                loss = float(reduced[0]["loss"]) if reduced else float("nan")
                history.append({"step": step, "greedy_val": greedy, "loss": loss})
                if metrics is not None:
                    metrics.log(step, {"greedy_val": greedy, "loss": loss}, prefix="warmup")
                log(f"[warmup] step {step}: greedy target accuracy {greedy:.3f}")
                if greedy >= wcfg.stop_at_greedy and step >= wcfg.min_steps:
                    break
        save_model_as_hf(ddp, groups, cfg.model, out_dir, overwrite=True)
    finally:
        reward_fn.close()
    return {"steps": step, "greedy_val": greedy, "seconds": time.perf_counter() - t0, "history": history,
            "reached_threshold": bool(greedy >= wcfg.stop_at_greedy)}
