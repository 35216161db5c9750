"""Chunked vocab-parallel log-probs and entropy against a float64 plain-torch oracle
(``torch.log_softmax`` + gather), values and gradients, for every chunk size, temperature and dtype;
and against the whole-tensor path (``chunk_tokens = 0``) at 1e-6. TP = 2 runs on gloo
(``test_logprobs_tp.py``)."""

import pytest
import torch

from megatron_cropi.model.logprobs import DEFAULT_CHUNK_TOKENS, vocab_parallel_entropy, vocab_parallel_logprobs

B, S, V = 3, 7, 50  # N = 21 positions
CHUNKS = [1, 4, 5, 21, 1000, DEFAULT_CHUNK_TOKENS]


def oracle(logits, targets, temperature):
    """float64 log-prob of the target and entropy, by torch.log_softmax: ``[B, S]`` each."""
    lsm = torch.log_softmax(logits.double() / temperature, dim=-1)
    logp = lsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, -(lsm.exp() * lsm).sum(-1)


def data(dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(B, S, V, generator=gen, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, V, (B, S), generator=gen)
    w_logp = torch.randn(B, S, generator=gen, dtype=torch.float64)
    w_ent = torch.randn(B, S, generator=gen, dtype=torch.float64)
    return logits, targets, w_logp, w_ent


def values_and_grad(fn_logp, fn_ent, logits, targets, w_logp, w_ent):
    """log-probs, entropy and d(Σ w·logp + Σ w'·H)/d logits (the shape of the POPI and GRPO losses)."""
    x = logits.detach().clone().requires_grad_(True)
    logp, ent = fn_logp(x, targets), fn_ent(x)
    ((w_logp * logp.double()).sum() + (w_ent * ent.double()).sum()).backward()
    return logp.detach().double(), ent.detach().double(), x.grad.double()


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_float64_equals_oracle(chunk, temperature):
    logits, targets, w_logp, w_ent = data(torch.float64)
    got = values_and_grad(lambda x, t: vocab_parallel_logprobs(x, t, temperature=temperature, chunk_tokens=chunk),
                          lambda x: vocab_parallel_entropy(x, temperature=temperature, chunk_tokens=chunk),
                          logits, targets, w_logp, w_ent)
    want = values_and_grad(lambda x, t: oracle(x, t, temperature)[0], lambda x: oracle(x, targets, temperature)[1],
                           logits, targets, w_logp, w_ent)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=0, atol=1e-12), (g - w).abs().max()


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_float32_equals_oracle_and_whole_tensor_path(chunk, temperature):
    logits, targets, w_logp, w_ent = data(torch.float32)

    def run(c):
        return values_and_grad(lambda x, t: vocab_parallel_logprobs(x, t, temperature=temperature, chunk_tokens=c),
                               lambda x: vocab_parallel_entropy(x, temperature=temperature, chunk_tokens=c),
                               logits, targets, w_logp, w_ent)

    got, whole = run(chunk), run(0)
    want = values_and_grad(lambda x, t: oracle(x, t, temperature)[0], lambda x: oracle(x, targets, temperature)[1],
                           logits, targets, w_logp, w_ent)
    for g, h, w in zip(got, whole, want):
        scale = max(1.0, w.abs().max().item())  # logits up to 17: fp32 rounding is relative
        assert (g - w).abs().max() <= 1e-5 * scale  # fp32 work vs float64
        assert (g - h).abs().max() <= 1e-6 * scale  # = today's path (values bit for bit here)


def test_bfloat16_logits_give_bfloat16_gradient_equal_to_whole_path():
    logits, targets, w_logp, w_ent = data(torch.bfloat16)
    x = {c: logits.detach().clone().requires_grad_(True) for c in (0, 4)}
    for c, xc in x.items():
        lp = vocab_parallel_logprobs(xc, targets, chunk_tokens=c)
        ent = vocab_parallel_entropy(xc, chunk_tokens=c)
        assert lp.dtype == torch.float32 and ent.dtype == torch.float32
        ((w_logp * lp).sum() + (w_ent * ent).sum()).backward()
        assert xc.grad.dtype == torch.bfloat16
    assert torch.allclose(x[4].grad.float(), x[0].grad.float(), rtol=0, atol=1e-2)
    want = oracle(logits, targets, 1.0)[0]
    got = vocab_parallel_logprobs(logits, targets, chunk_tokens=4)
    assert torch.allclose(got.double(), want, atol=1e-5)  # bf16 inputs are exact in fp32 work


def test_non_contiguous_logits_and_no_grad():
    logits, targets, _, _ = data(torch.float64)
    t_logits = logits.transpose(0, 1).contiguous().transpose(0, 1)  # [B, S, V] view of an [S, B, V] tensor
    assert not t_logits.is_contiguous()
    with torch.no_grad():
        got = vocab_parallel_logprobs(t_logits, targets, chunk_tokens=4)
    assert torch.allclose(got, oracle(logits, targets, 1.0)[0], atol=1e-12)


def test_errors_name_the_argument():
    logits, targets, _, _ = data(torch.float32)
    with pytest.raises(ValueError, match="chunk_tokens"):
        vocab_parallel_logprobs(logits, targets, chunk_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_entropy(logits, temperature=0.0)
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_logprobs(logits, targets[:, :-1])
