"""POPI capture under activation recomputation with pipeline parallelism equals the autograd oracle.

With ``recompute_granularity: full`` a layer's forward runs again inside its micro-batch's backward;
on the first pipeline stage 1F1B has already run the next micro-batch's forward by then (PP = 2, 4
micro-batches: fwd0 fwd1 bwd0 fwd2 bwd1 ...). Each prompt's sketch must still be its own gradient:
both capture modes, PP = 2 and TP2×PP2, full (uniform and block) and selective recomputation, against
plain autograd per prompt at TP = PP = 1 (no recomputation), projected by global name.
"""

import pytest
import torch

from megatron_cropi.testing.spawn import run_ranks

from test_popi_capture import K, SEQ, NameSeededDense, autograd_backward, make_groups  # noqa: E402  (tests/distributed on sys.path)

G = 8  # batched: 2 prompts per micro-batch -> 4 micro-batches; per_prompt: 8
RECOMPUTE = {
    "full-uniform": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "full-block": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
    "selective": {"recompute_granularity": "selective"},
}
LAYOUTS = [(1, 2), (2, 2)]
MODES = (("per_prompt", 1), ("batched", 2))


def _worker(recompute_names):
    import torch.distributed as dist

    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed
    from megatron_cropi.popi.batch import pack_microbatches
    from megatron_cropi.popi.capture import PopiCapture
    from megatron_cropi.popi.loss import PopiLossConfig
    from megatron_cropi.projection.base import ShardSpec
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed()
    base = tiny_model_config("tiny")
    groups_data = make_groups(base.vocab_size, seed=1, num=G, mixed=True)
    projector = NameSeededDense(k=64)
    loss_cfg = PopiLossConfig(clip_eps=None)
    results = {}

    g = build_parallel_groups(1, 1)
    model = build_tiny_model(base, g, seed=5)
    oracle = []
    for i in range(G):
        autograd_backward(model, groups_data[i], g, loss_cfg)
        full = assemble_global_tensors(model, g)
        oracle.append(sum(projector.project(v[None], ShardSpec.whole(n, v.shape))[0] for n, v in full.items()))
    results["oracle"] = torch.stack(oracle)
    destroy_parallel_groups()

    for name in recompute_names:
        cfg = tiny_model_config("tiny", transformer=RECOMPUTE[name])
        for tp, pp in LAYOUTS:
            g = build_parallel_groups(tp, pp)
            model = build_tiny_model(cfg, g, seed=5)
            for mode, ppm in MODES:
                mbs = pack_microbatches(groups_data, list(range(G)), prompts_per_microbatch=ppm,
                                        responses_per_prompt=K, seq_length=SEQ)
                assert len(mbs) >= 4
                out = PopiCapture(model, g, projector, mode=mode, loss_cfg=loss_cfg).run(mbs, G, K)
                results[(name, tp, pp, mode)] = (out.sketches, out.finite)
            destroy_parallel_groups()
    return results if dist.get_rank() == 0 else None


@pytest.mark.timeout(600)
def test_capture_under_recompute_and_pipeline_matches_autograd_oracle():
    names = list(RECOMPUTE)
    results = run_ranks(_worker, 4, args=(names,), timeout_s=580)[0]
    oracle = results["oracle"]
    assert oracle.abs().max() > 0
    errors = {}
    for name in names:
        for tp, pp in LAYOUTS:
            for mode, _ in MODES:
                sk, finite = results[(name, tp, pp, mode)]
                assert finite.all(), (name, tp, pp, mode)
                errors[(name, tp, pp, mode)] = ((sk - oracle).norm(dim=1) / oracle.norm(dim=1)).max().item()
    bad = {key: f"{err:.2e}" for key, err in errors.items() if not err < 1e-4}
    assert not bad, f"relative error >= 1e-4 (recompute, TP, PP, mode): {bad}"
