"""Chunked log-probs and entropy at TP = 2 (gloo, two spawned ranks, no model): each rank holds half
the vocabulary; values and each rank's slice of the gradient equal the float64 oracle on the whole
vocabulary, and the whole-tensor path (``chunk_tokens = 0``) at 1e-6."""

import torch

from megatron_cropi.testing.spawn import run_ranks

B, S, V, TP = 2, 5, 40, 2


def _inputs(dtype):
    gen = torch.Generator().manual_seed(3)
    logits = (3.0 * torch.randn(B, S, V, generator=gen, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, V, (B, S), generator=gen)
    # targets on both ranks' halves: the picked logit comes from the owning rank only
    targets[0, :2] = torch.tensor([0, V - 1])
    return logits, targets, torch.randn(B, S, generator=gen, dtype=torch.float64), torch.randn(B, S, generator=gen,
                                                                                               dtype=torch.float64)


CASES = ((torch.float32, 0.7, (0, 1, 3, 1000)), (torch.float64, 1.0, (1, 3, 1000)))


def _worker():
    import torch.distributed as dist

    from megatron_cropi.model.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs
    from megatron_cropi.parallel import init_distributed

    init_distributed(backend="gloo")
    rank = dist.get_rank()
    group = dist.new_group([0, 1])
    out = {}
    for dtype, temperature, chunks in CASES:
        logits, targets, w_logp, w_ent = _inputs(dtype)
        shard = logits[..., rank * V // TP:(rank + 1) * V // TP]
        for c in chunks:
            x = shard.detach().clone().requires_grad_(True)
            logp = vocab_parallel_logprobs(x, targets, tp_group=group, tp_rank=rank, temperature=temperature,
                                           chunk_tokens=c)
            ent = vocab_parallel_entropy(x, tp_group=group, temperature=temperature, chunk_tokens=c)
            ((w_logp * logp.double()).sum() + (w_ent * ent.double()).sum()).backward()
            out[dtype, c] = (logp.detach().double(), ent.detach().double(), x.grad.double())
    return out


def _oracle(dtype, temperature):
    logits, targets, w_logp, w_ent = _inputs(dtype)
    x = logits.double().requires_grad_(True)
    lsm = torch.log_softmax(x / temperature, dim=-1)
    logp = lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    ((w_logp * logp).sum() + (w_ent * ent).sum()).backward()
    return logp.detach(), ent.detach(), x.grad


def test_tp2_equals_oracle_and_whole_path():
    ranks = run_ranks(_worker, TP, timeout_s=180)
    for dtype, temperature, chunks in CASES:
        # fp32 work against float64; float64 logits are worked in float64 on the chunked path
        # (the whole-tensor path works in fp32 whatever the input, so it is compared at fp32 only)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        want = _oracle(dtype, temperature)
        for c in chunks:
            got_lp, got_ent = ranks[0][dtype, c][0], ranks[0][dtype, c][1]
            assert all(torch.equal(r[dtype, c][0], got_lp) and torch.equal(r[dtype, c][1], got_ent)
                       for r in ranks)  # replicated on every TP rank
            grad = torch.cat([r[dtype, c][2] for r in ranks], dim=-1)
            for g, w in zip((got_lp, got_ent, grad), want):
                assert (g - w).abs().max() <= tol * max(1.0, w.abs().max().item()), (dtype, c, (g - w).abs().max())
        if 0 in chunks:  # chunked = today's whole-tensor path at 1e-6
            for c in chunks[1:]:
                for r in ranks:
                    for g, h in zip(r[dtype, c], r[dtype, 0]):
                        assert (g - h).abs().max() <= 1e-6 * max(1.0, h.abs().max().item())
