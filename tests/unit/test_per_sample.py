"""Per-prompt gradient pieces from batched activations equal per-prompt autograd gradients."""

import pytest
import torch

from megatron_cropi.popi.per_sample import (
    grouped_bias_grads,
    grouped_embedding_grads,
    grouped_linear_weight_grads,
    grouped_norm_grads,
)

S, G, K, I, O = 5, 3, 2, 4, 6


def _per_group_autograd(module, x, make_loss):
    grads = []
    for g in range(G):
        module.zero_grad()
        make_loss(module, x[:, g * K:(g + 1) * K], g).backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    return grads


def test_linear_weight_and_bias():
    torch.manual_seed(0)
    lin = torch.nn.Linear(I, O)
    x = torch.randn(S, G * K, I)
    w_out = torch.randn(S, G * K, O)

    def loss(m, xs, g):
        return (m(xs) * w_out[:, g * K:(g + 1) * K]).sum()

    ref = _per_group_autograd(lin, x, loss)
    dy = w_out  # d loss / d y
    dw = grouped_linear_weight_grads(x, dy, K)
    db = grouped_bias_grads(dy, K)
    for g in range(G):
        assert torch.allclose(dw[g], ref[g]["weight"], atol=1e-5)
        assert torch.allclose(db[g], ref[g]["bias"], atol=1e-5)


@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
def test_norm_affine_grads(kind):
    torch.manual_seed(1)
    norm = torch.nn.RMSNorm(I, eps=1e-5) if kind == "RMSNorm" else torch.nn.LayerNorm(I, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(S, G * K, I)
    w_out = torch.randn(S, G * K, I)
    ref = _per_group_autograd(norm, x, lambda m, xs, g: (m(xs) * w_out[:, g * K:(g + 1) * K]).sum())
    dgamma, dbeta = grouped_norm_grads(x, w_out, K, kind=kind, eps=1e-5)
    for g in range(G):
        assert torch.allclose(dgamma[g], ref[g]["weight"], atol=1e-5)
        if kind == "LayerNorm":
            assert torch.allclose(dbeta[g], ref[g]["bias"], atol=1e-5)
    with pytest.raises(ValueError, match="unsupported norm"):
        grouped_norm_grads(x, w_out, K, kind="BatchNorm", eps=1e-5)


def test_embedding_rows_of_a_vocab_shard():
    torch.manual_seed(2)
    V, H, start, local = 10, 3, 4, 4  # this rank holds rows 4..7
    emb = torch.nn.Embedding(V, H)
    ids = torch.randint(0, V, (G * K, S))
    w_out = torch.randn(G * K, S, H)
    ref = []
    for g in range(G):
        emb.zero_grad()
        (emb(ids[g * K:(g + 1) * K]) * w_out[g * K:(g + 1) * K]).sum().backward()
        ref.append(emb.weight.grad[start:start + local].clone())
    got = grouped_embedding_grads(ids, w_out, K, vocab_start=start, vocab_size_local=local)
    for g in range(G):
        assert torch.allclose(got[g], ref[g], atol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="whole number of groups"):
        grouped_linear_weight_grads(torch.zeros(S, 5, I), torch.zeros(S, 5, O), 2)
    with pytest.raises(ValueError, match="disagree"):
        grouped_linear_weight_grads(torch.zeros(S, 4, I), torch.zeros(S + 1, 4, O), 2)


@pytest.mark.parametrize("block_bytes", [1 << 30, 200, 1])
def test_blocked_forms_equal_the_whole_tensors(block_bytes):
    """Blocks of prompts × rows (× positions) cover every entry once: the same sums as the whole
    tensors, with a budget that cuts nothing, one that cuts every dimension, and one row at a time."""
    from megatron_cropi.popi.per_sample import embedding_grad_blocks, linear_grad_blocks, norm_grads_chunked

    torch.manual_seed(3)
    x, dy = torch.randn(S, G * K, I), torch.randn(S, G * K, O)
    dw, db = torch.full((G, O, I), float("nan")), torch.full((G, O), float("nan"))

    def put_w(g0, g1, r0, r1, w, b):
        assert w.shape == (g1 - g0, r1 - r0, I) and b.shape == (g1 - g0, r1 - r0)
        dw[g0:g1, r0:r1], db[g0:g1, r0:r1] = w, b

    for rows in ((0, 2), (2, O)):  # two row ranges, as a SwiGLU fc1's halves
        linear_grad_blocks(x, dy, K, G, rows, put_w, bias=True, block_bytes=block_bytes)
    assert torch.allclose(dw, grouped_linear_weight_grads(x, dy, K), atol=1e-5)
    assert torch.allclose(db, grouped_bias_grads(dy, K), atol=1e-5)

    V, H, start, local = 10, 3, 4, 4
    ids, w_out = torch.randint(0, V, (G * K, S)), torch.randn(G * K, S, H)
    de = torch.full((G, local, H), float("nan"))

    def put_e(g0, g1, r0, r1, e):
        de[g0:g1, r0:r1] = e

    embedding_grad_blocks(ids, w_out, K, G, put_e, vocab_start=start, vocab_size_local=local, block_bytes=block_bytes)
    assert torch.allclose(de, grouped_embedding_grads(ids, w_out, K, vocab_start=start, vocab_size_local=local),
                          atol=1e-5)

    xn, dyn = torch.randn(S, G * K, 2, I), torch.randn(S, G * K, 2, I)  # per-head norm: [S, N, heads, d]
    for kind in ("RMSNorm", "LayerNorm"):
        got = norm_grads_chunked(xn, dyn, K, G, kind=kind, eps=1e-5, block_bytes=block_bytes)
        want = grouped_norm_grads(xn, dyn, K, kind=kind, eps=1e-5)
        assert torch.allclose(got[0], want[0], atol=1e-5)
        assert (got[1] is None) == (want[1] is None) and (got[1] is None or torch.allclose(got[1], want[1], atol=1e-5))
    # the first groups only (padding groups of a last micro-batch are never formed)
    linear_grad_blocks(x, dy, K, 1, (0, O), lambda g0, g1, *_: None if g1 <= 1 else pytest.fail("group 1 formed"))
