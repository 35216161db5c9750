"""Sharded projection over real gloo ranks: each rank projects its blocks, ``reduce_sketch`` sums over
TP then PP, and the result equals the projection of the unsharded gradient (1e-5 relative).

1. Synthetic tensors split the ways Megatron splits them (ColumnParallel rows, RowParallel columns,
   SwiGLU's two blocks per shard, a replicated norm owned by TP rank 0), every backend.
2. Real per-prompt gradients of a tiny Megatron GPT under TP=2 and under PP=2 with tied embeddings
   (each stage holds a partial embedding gradient), against TP=1/PP=1 on the same ranks.
"""

import pytest
import torch

from megatron_cropi.testing.spawn import run_ranks

KINDS = ("gaussian", "rademacher", "sjlt", "dense")


def _projector(kind):
    from megatron_cropi.projection import ProjectionConfig, build_projector

    return build_projector(ProjectionConfig(kind=kind, k=48, keep_ratio=0.5, seed=4, sjlt_s=2))


def _synthetic_worker():
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed
    from megatron_cropi.projection import ShardSpec, reduce_sketch

    init_distributed()
    gen = torch.Generator().manual_seed(0)
    B = 3
    col = torch.randn(B, 16, 12, generator=gen)   # ColumnParallel weight: split along dim 0
    row = torch.randn(B, 12, 16, generator=gen)   # RowParallel weight: split along dim 1
    fc1 = torch.randn(B, 16, 12, generator=gen)   # SwiGLU fc1 [gate; up]: each shard = 2 blocks
    norm = torch.randn(B, 12, generator=gen)      # replicated: owned by TP rank 0
    stage = torch.randn(B, 2, 20, generator=gen)  # PP: one parameter per stage
    out = {}
    groups = build_parallel_groups(2, 1)
    r = groups.tp_rank
    for kind in KINDS:
        p = _projector(kind)
        ref = p.project_many([(col, ShardSpec.whole("col", (16, 12))), (row, ShardSpec.whole("row", (12, 16))),
                              (fc1, ShardSpec.whole("fc1", (16, 12))), (norm, ShardSpec.whole("norm", (12,)))])
        items = [
            (col[:, 8 * r : 8 * r + 8], ShardSpec("col", (16, 12), (8 * r, 0), (8, 12))),
            (row[:, :, 8 * r : 8 * r + 8], ShardSpec("row", (12, 16), (0, 8 * r), (12, 8))),
            (fc1[:, 4 * r : 4 * r + 4], ShardSpec("fc1", (16, 12), (4 * r, 0), (4, 12))),
            (fc1[:, 8 + 4 * r : 12 + 4 * r], ShardSpec("fc1", (16, 12), (8 + 4 * r, 0), (4, 12))),
        ]
        if r == 0:
            items.append((norm, ShardSpec.whole("norm", (12,))))
        sketch = reduce_sketch(_projector(kind).project_many(items), groups)
        out[("tp", kind)] = ((sketch - ref).abs().max() / ref.abs().max()).item()
    destroy_parallel_groups()
    groups = build_parallel_groups(1, 2)
    for kind in KINDS:
        p = _projector(kind)
        ref = p.project(stage.reshape(B, 40), ShardSpec.whole("stages", (40,)))
        mine = stage[:, groups.pp_rank]
        sketch = reduce_sketch(p.project(mine, ShardSpec("stages", (40,), (20 * groups.pp_rank,), (20,))), groups)
        out[("pp", kind)] = ((sketch - ref).abs().max() / ref.abs().max()).item()
    destroy_parallel_groups()
    return out


def _worker(layouts):
    """Both checks in one spawn of two ranks (spawning and importing Megatron dominate the cost)."""
    return _synthetic_worker(), _model_worker(layouts)


@pytest.fixture(scope="module")
def rank_results():
    return run_ranks(_worker, 2, args=([(1, 1), (2, 1), (1, 2)],), timeout_s=200)


@pytest.mark.timeout(240)
def test_sharded_blocks_sum_to_the_unsharded_projection_on_two_ranks(rank_results):
    for rank, (errs, _) in enumerate(rank_results):
        assert len(errs) == 2 * len(KINDS)
        for key, err in errs.items():
            assert err < 1e-5, (rank, key, err)


SEQ, B = 16, 2


def _per_prompt_grads(model, groups, batches):
    """``{local_name: [B, *shape]}``: one backward per prompt through Megatron's schedule."""
    from megatron_cropi.model.schedule import causal_attention_mask, forward_backward

    mask = causal_attention_mask(SEQ, groups.device)
    pos = torch.arange(SEQ).unsqueeze(0)
    per_prompt = []
    for batch in batches:
        for p in model.parameters():
            p.grad = None

        def forward_step(data_iterator, model):
            d = next(data_iterator)
            out = model(input_ids=d["tokens"], position_ids=pos, attention_mask=mask, labels=d["labels"])
            return out, lambda t: ((t.float() * d["loss_mask"]).sum() / d["loss_mask"].sum(), {})

        forward_backward(model, groups, forward_step_func=forward_step, data_iterator=iter([batch]),
                         num_microbatches=1, seq_length=SEQ, micro_batch_size=1)
        per_prompt.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    return {n: torch.stack([g[n] for g in per_prompt]) for n in per_prompt[0]}


def _model_worker(layouts):
    from megatron_cropi.model.params import param_layouts
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed
    from megatron_cropi.projection import project_local_gradients, reduce_sketch
    from megatron_cropi.testing.tiny import build_tiny_model, random_lm_batches, tiny_model_config

    init_distributed()  # a no-op when _synthetic_worker already did
    cfg = tiny_model_config(tie_word_embeddings=True)
    batches = random_lm_batches(B, 1, SEQ, cfg.vocab_size, seed=5)
    sketches = {}
    for tp, pp in layouts:
        groups = build_parallel_groups(tp, pp)
        model = build_tiny_model(cfg, groups, seed=3)
        grads = _per_prompt_grads(model, groups, batches)
        layout = param_layouts(model, groups)
        for kind in ("sjlt", "gaussian"):
            partial = project_local_gradients(_projector(kind), grads, layout, groups)
            sketches[(tp, pp, kind)] = reduce_sketch(partial, groups)
        destroy_parallel_groups()
    return sketches


@pytest.mark.timeout(240)
def test_tiny_gpt_per_prompt_sketch_is_the_same_under_tp2_and_pp2_tied(rank_results):
    for rank, (_, sketches) in enumerate(rank_results):
        for kind in ("sjlt", "gaussian"):
            ref = sketches[(1, 1, kind)]
            assert ref.shape == (B, 48) and ref.abs().min() > 0
            assert not torch.allclose(ref[0], ref[1])  # two different prompts
            for layout in ((2, 1), (1, 2)):
                err = ((sketches[layout + (kind,)] - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-5, (rank, layout, kind, err)
