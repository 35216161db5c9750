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
