"""Loads that stick (issue 14): after every load path the next optimizer step starts from the loaded weights.

A bf16 model's megatron-core optimizer (distributed or not) steps its own fp32 main copy of the weights
and writes it back into the model, so a load that fills the model but not that copy is undone by the
first step. Here a policy A (seeded 7, one GRPO step at a large LR) is saved as a checkpoint and as an
HF directory; fresh policies B (seeded 1, LR 1e-9: a step moves no bf16 weight) load it by each path
and take one optimizer step, after which their weights must still be A's:

* weights only (``load_optimizer=False``), DP=2 with the distributed optimizer;
* weights only, resharded into TP=2;
* weights only, DP=2 with the non-distributed mixed-precision optimizer;
* the HF import (:meth:`GrpoTrainer.load_hf`);
* a full load of a checkpoint saved before any optimizer step (no optimizer state to read).

On the code before the fix every case ends at B's own initial weights. A full bf16 load (main weights
and Adam moments from the checkpoint) must also resume A's run exactly: before the fix of megatron-core's
parameter→main-weight map for groups mixing fp32 norms and bf16 weights, saving it failed.
"""

import pytest

from megatron_cropi.testing.spawn import run_ranks

BF16 = {"vocab_size": 32, "params_dtype": "bfloat16"}
GRPO = {"steps": 4, "prompts_per_step": 8, "micro_batch_prompts": 4,
        "loss": {"kl_coef": 0.0, "entropy_coef": 0.0}, "optim": {"lr": 3e-2, "weight_decay": 0.0}}


def _grpo(lr, **optim):
    return {**GRPO, "optim": {**GRPO["optim"], "lr": lr, **optim}}


def _max_diff(a, b):
    return max((a[n].float() - b[n].float()).abs().max().item() for n in a)


def _worker(tmp):
    import torch.distributed as dist

    from megatron_cropi.checkpoint import save_model_as_hf
    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed
    from megatron_cropi.testing.grpo_tiny import build_tiny_trainer, easy_prompts

    init_distributed()
    prompts = easy_prompts(2)

    def build(g, lr, seed, **optim):
        return build_tiny_trainer(g, _grpo(lr, **optim), model=BF16, init_seed=seed, prompts=prompts,
                                  checkpoint_dir=f"{tmp}/ckpt-{seed}")

    def weights(t, g):
        return assemble_global_tensors(t.model, g, attr="data")

    out = {}
    g = build_parallel_groups(1, 1)
    a = build(g, 3e-2, 7)
    fresh_ckpt = a.save()  # before any optimizer step: the checkpoint has no optimizer state
    out["a0"] = weights(a, g)
    assert a.step()["updates"] == 1
    ckpt = a.save()
    save_model_as_hf(a.model, g, a.model_cfg, f"{tmp}/hf")
    out["a1"] = weights(a, g)
    a.step()
    out["a2"] = weights(a, g)  # what a resumed run's next step must reproduce
    destroy_parallel_groups()

    # a full bf16 load (weights, fp32 main weights and moments of the distributed optimizer) resumes exactly
    g = build_parallel_groups(1, 1)
    b = build(g, 3e-2, 1)
    b.load(ckpt)
    b.step()
    out["resumed"] = _max_diff(weights(b, g), out["a2"])
    destroy_parallel_groups()

    cases = [("weights_only_dp2", (1, 1), {}, lambda t: t.load(ckpt, load_optimizer=False), "a1"),
             ("weights_only_tp2", (2, 1), {}, lambda t: t.load(ckpt, load_optimizer=False), "a1"),
             ("weights_only_dp2_local_optimizer", (1, 1), {"use_distributed_optimizer": False},
              lambda t: t.load(ckpt, load_optimizer=False), "a1"),
             ("hf_import", (1, 1), {}, lambda t: t.load_hf(f"{tmp}/hf"), "a1"),
             ("before_first_step_full_load", (1, 1), {}, lambda t: t.load(fresh_ckpt), "a0")]
    for name, (tp, pp), optim, load, want in cases:
        g = build_parallel_groups(tp, pp)
        b = build(g, 1e-9, 1, **optim)
        init = weights(b, g)
        load(b)
        loaded = weights(b, g)
        m = b.step()
        stepped = weights(b, g)
        out[name] = {"updates": m["updates"], "loaded": _max_diff(loaded, out[want]),
                     "stepped": _max_diff(stepped, out[want]), "init_vs_want": _max_diff(init, out[want])}
        destroy_parallel_groups()
    return out if dist.get_rank() == 0 else None


@pytest.mark.timeout(420)
def test_every_load_path_survives_the_first_optimizer_step(tmp_path):
    out = run_ranks(_worker, 2, args=(str(tmp_path),), timeout_s=400)[0]
    assert _max_diff(out["a1"], out["a0"]) > 1e-2  # A's step moved its weights: the cases can tell them apart
    assert _max_diff(out["a2"], out["a1"]) > 1e-2
    assert out["resumed"] <= 1e-6, f"a full bf16 load did not resume A's run: {out['resumed']}"
    for name in ["weights_only_dp2", "weights_only_tp2", "weights_only_dp2_local_optimizer", "hf_import",
                 "before_first_step_full_load"]:
        r = out[name]
        assert r["init_vs_want"] > 1e-2, (name, r)  # B's own weights are far from what it loads
        assert r["updates"] == 1, (name, r)
        assert r["loaded"] == 0.0, (name, r)
        assert r["stepped"] <= 1e-6, f"{name}: the first optimizer step undid the load: {r}"
