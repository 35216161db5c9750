"""Guards of the GRPO update (issue 14), on 2 ranks (DP=2, distributed optimizer):

* **NaN guard**: a NaN injected into one gradient on one rank (the learner's ``after_backward`` fault
  hook) skips that optimizer step on every rank; it is counted (``nonfinite_updates``,
  ``nonfinite_total``), written to TensorBoard and the step log (a warning), the weights stay those of
  the previous step and no weight push happens, so the engine keeps them; the next step trains again.
  Before the guard the NaN went through the clip (a NaN norm) into the weights and was pushed.
* **Mismatch**: with ``old_logprobs: recompute`` the engine/trainer log-prob gap is reported per step and
  written to TensorBoard; rollout log-probs shifted by +0.1 give a gap of 0.1, the k3 KL
  ``e^−0.1 − 1 + 0.1`` and, with ``tis_imp_ratio_cap``, mean TIS weight ``e^−0.1``.
* **Zero-variance groups**: dropped by default (not in the token-mean's denominator), kept with
  ``drop_zero_variance_groups: false`` (every response token counts, as verl's), and a batch of only
  zero-variance groups then still takes an optimizer step.
"""

import math

import pytest

from megatron_cropi.testing.spawn import run_ranks

GRPO = {"steps": 4, "prompts_per_step": 8, "micro_batch_prompts": 4,
        "loss": {"kl_coef": 0.001, "entropy_coef": 0.0}, "optim": {"lr": 3e-3, "weight_decay": 0.0}}


def _worker(tb):
    import dataclasses
    import logging

    import numpy as np
    import torch
    import torch.distributed as dist

    from megatron_cropi.grpo.weight_sync import WeightSync
    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.parallel import build_parallel_groups, init_distributed
    from megatron_cropi.testing.grpo_tiny import build_tiny_trainer, easy_prompts

    init_distributed()
    g = build_parallel_groups(1, 1)

    def weights(t):
        return assemble_global_tensors(t.model, g, attr="data")

    class RecordingSync(WeightSync):  # what an engine would receive
        def __init__(self):
            self.pushed = []

        def push(self, model, groups):
            self.pushed.append(assemble_global_tensors(model.module, groups, attr="data"))  # model: the DDP wrapper
            return 0.0

    warnings = []
    handler = logging.Handler()
    handler.emit = lambda rec: warnings.append(rec.getMessage())
    logging.getLogger("megatron_cropi.grpo.trainer").addHandler(handler)

    out = {}
    t = build_tiny_trainer(g, GRPO, prompts=easy_prompts(8), metrics_dir=tb)
    t.weight_sync = sync = RecordingSync()
    m1 = t.step()
    w1 = weights(t)

    def poison(model):  # one element of one gradient, on rank 0 only
        if dist.get_rank() == 0:
            next(p for p in model.parameters() if p.requires_grad).main_grad.view(-1)[3] = float("nan")

    t.learner.after_backward = poison
    m2 = t.step()
    w2 = weights(t)
    pushes_after_nan = len(sync.pushed)
    t.learner.after_backward = None
    m3 = t.step()
    w3 = weights(t)
    t.close()
    out["nan"] = {
        "m1": m1, "m2": m2, "m3": m3, "pushes_after_nan": pushes_after_nan, "pushes": len(sync.pushed),
        "kept": max((w2[n] - w1[n]).abs().max().item() for n in w1),
        "last_push_vs_w1": max((sync.pushed[0][n] - w1[n]).abs().max().item() for n in w1),
        "moved_after": max((w3[n] - w2[n]).abs().max().item() for n in w1),
        "finite": all(bool(torch.isfinite(w).all()) for w in w3.values()),
        "warnings": list(warnings)}

    # the engine/trainer mismatch, measured and corrected
    per = 4
    mine = easy_prompts(2)[g.dp_rank * per:(g.dp_rank + 1) * per]
    positions = list(range(g.dp_rank * per, (g.dp_rank + 1) * per))
    for tis in (None, 2.0):
        cfg = {**GRPO, "old_logprobs": "recompute", "loss": {**GRPO["loss"], "tis_imp_ratio_cap": tis}}
        t = build_tiny_trainer(g, cfg, metrics_dir=f"{tb}-recompute-{tis}")
        groups = t.collector.collect(mine, t.sampling)
        shifted = [dataclasses.replace(grp, responses=tuple(dataclasses.replace(r, logprobs=r.logprobs + 0.1)
                                                            for r in grp.responses)) for grp in groups]
        out[f"recompute_{tis}"] = t.train_on_rollouts(shifted, positions)
        t.close()

    # zero-variance groups: half the groups of each rank have all-equal rewards
    def with_rewards(groups, flat):
        k = len(groups[0].rewards)
        return [dataclasses.replace(grp, rewards=np.ones(k, np.float32) if i in flat
                                    else np.arange(k, dtype=np.float32) % 2) for i, grp in enumerate(groups)]

    for drop in (True, False):
        t = build_tiny_trainer(g, {**GRPO, "drop_zero_variance_groups": drop})
        groups = t.collector.collect(mine, t.sampling)
        tokens = [sum(len(r.token_ids) for r in grp.responses) for grp in groups]
        mixed = t.train_on_rollouts(with_rewards(groups, {0, 1}), positions)
        flat = t.train_on_rollouts(with_rewards(groups, set(range(per))), positions)
        counts = torch.tensor([sum(tokens), sum(tokens[2:])], dtype=torch.float64)
        dist.all_reduce(counts)
        out[f"drop_{drop}"] = {"mixed": mixed, "flat": flat, "all_tokens": counts[0].item(),
                               "signal_tokens": counts[1].item()}
    return out if dist.get_rank() == 0 else None


@pytest.mark.timeout(420)
def test_nan_guard_mismatch_and_zero_variance(tmp_path):
    from megatron_cropi.metrics import read_scalars

    out = run_ranks(_worker, 2, args=(str(tmp_path / "tb"),), timeout_s=400)[0]

    n = out["nan"]
    assert n["m1"]["updates"] == 1 and n["m1"]["nonfinite_updates"] == 0
    assert n["m2"]["updates"] == 0 and n["m2"]["nonfinite_updates"] == 1 and n["m2"]["nonfinite_total"] == 1
    assert n["kept"] == 0.0, "the step with a NaN gradient changed the weights"
    assert n["pushes_after_nan"] == 1, "a skipped step pushed weights to the engine"
    assert n["last_push_vs_w1"] == 0.0  # the engine holds the previous step's weights
    assert n["m3"]["updates"] == 1 and n["m3"]["nonfinite_total"] == 1 and n["pushes"] == 2
    assert n["finite"] and n["moved_after"] > 0, "training did not resume cleanly after the skipped step"
    assert any("step 2: non-finite gradient in 1 of 1 updates, skipped" in w for w in n["warnings"]), n["warnings"]
    assert "rollout_kl" not in n["m1"]  # behaviour old log-probs: no mismatch to report
    scalars = read_scalars(tmp_path / "tb")
    assert [v for _, v in scalars["train/nonfinite_updates"]] == [0.0, 1.0, 0.0]
    assert [v for _, v in scalars["train/nonfinite_total"]] == [0.0, 1.0, 1.0]

    for tis in (None, 2.0):
        m = out[f"recompute_{tis}"]
        assert m["updates"] == 1
        assert m["rollout_logprob_abs_diff"] == pytest.approx(0.1, abs=1e-4)
        assert m["rollout_kl"] == pytest.approx(math.exp(-0.1) - 1 + 0.1, abs=1e-5)
        tags = read_scalars(tmp_path / f"tb-recompute-{tis}")
        assert tags["train/rollout_logprob_abs_diff"][0][1] == pytest.approx(0.1, abs=1e-4)
    assert "tis_weight_mean" not in out["recompute_None"]
    assert out["recompute_2.0"]["tis_weight_mean"] == pytest.approx(math.exp(-0.1), abs=1e-4)
    assert out["recompute_2.0"]["tis_capped_frac"] == 0.0

    drop, keep = out["drop_True"], out["drop_False"]
    assert drop["signal_tokens"] < drop["all_tokens"]
    assert drop["mixed"]["response_tokens"] == drop["signal_tokens"] and drop["mixed"]["live_groups"] == 4
    assert keep["mixed"]["response_tokens"] == keep["all_tokens"] and keep["mixed"]["live_groups"] == 8
    assert drop["flat"]["skipped"] == 1 and drop["flat"]["updates"] == 0
    assert keep["flat"]["skipped"] == 0 and keep["flat"]["updates"] == 1 and keep["flat"]["zero_variance_groups"] == 8
