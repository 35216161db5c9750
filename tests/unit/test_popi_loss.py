"""The POPI loss: hand-computed values, advantages, options, and θ = β equals on-policy GRPO."""

import math

import pytest
import torch

from megatron_cropi.config.loader import ConfigError
from megatron_cropi.popi.loss import PopiLossConfig, group_advantages, popi_group_losses


def test_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5])
    gi = torch.tensor([0, 0, 0, 0, 1, 1, -1])
    adv = group_advantages(r, gi, 2, eps=1e-4)
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased
    expect = (1 - 0.5) / (std + 1e-4)
    assert torch.allclose(adv[:4], torch.tensor([expect, -expect, -expect, expect]), atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(3))  # all-equal group and padding: exact zeros


def test_self_normalised_statistics():
    r = torch.tensor([1.0, 0.0, 0.0])
    w = torch.tensor([2.0, 1.0, 1.0])
    adv = group_advantages(r, torch.zeros(3, dtype=torch.long), 1, eps=0.0, weights=w)
    mean = 2 / 4
    std = math.sqrt((2 * 0.25 + 2 * 0.25) / 4)
    assert torch.allclose(adv, torch.tensor([(1 - mean) / std, -mean / std, -mean / std]), atol=1e-6)


def test_loss_hand_computed_with_ratios_and_clipping():
    # one group, two responses: r = [1, 0] -> A = ±(0.5 / (std + eps)), std = sqrt(0.5)
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    lb = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    r = torch.tensor([1.0, 0.0])
    gi = torch.tensor([0, 0])
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    rho = math.exp(0.5)
    expect = -0.5 * (((rho + 1.0) / 2) * a + (1.0 * -a))
    got = popi_group_losses(lp, lb, mask, r, gi, 1)
    assert got.shape == (1,) and abs(got.item() - expect) < 1e-5
    clipped = popi_group_losses(lp, lb, mask, r, gi, 1, PopiLossConfig(clip_eps=0.2))
    expect_c = -0.5 * (((1.2 + 1.0) / 2) * a + (1.0 * -a))
    assert abs(clipped.item() - expect_c) < 1e-5


def test_bad_options_and_shapes():
    with pytest.raises(ConfigError, match="clip_eps"):
        PopiLossConfig(clip_eps=1.5)
    with pytest.raises(ValueError, match="same"):
        popi_group_losses(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2),
                          torch.zeros(2, dtype=torch.long), 1)


def test_theta_equals_beta_gives_on_policy_grpo_gradient():
    """At θ = β all ratios are 1 and ∇L_POPI = ∇[−(1/K) Σ_k (1/|τ_k|) Σ_t A_k log π(a_kt)]."""
    torch.manual_seed(0)
    K, T, V, H = 4, 5, 11, 7
    policy = torch.nn.Linear(H, V)
    feats = torch.randn(K, T, H)
    tokens = torch.randint(0, V, (K, T))
    mask = torch.ones(K, T)
    mask[1, 3:] = 0
    mask[2, 4:] = 0
    r = torch.tensor([1.0, 0.0, 1.0, 0.0])
    gi = torch.zeros(K, dtype=torch.long)

    def logp():
        return torch.log_softmax(policy(feats), -1).gather(-1, tokens[..., None])[..., 0]

    behaviour = logp().detach()
    popi = popi_group_losses(logp(), behaviour, mask, r, gi, 1)[0]
    g_popi = torch.autograd.grad(popi, list(policy.parameters()))
    # independent oracle: GRPO advantages by hand, A_k = (r_k − mean r) / (std r + ε), std with Bessel
    # correction (K − 1), ε = 1e-4 (the documented convention); r = [1, 0, 1, 0] gives ±0.5 / (√(1/3) + 1e-4)
    r64 = r.double()
    std = torch.sqrt(((r64 - r64.mean()) ** 2).sum() / (K - 1))
    adv = ((r64 - r64.mean()) / (std + 1e-4)).float()
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(adv, torch.tensor([a, -a, a, -a]), atol=1e-6)
    # on-policy GRPO surrogate with plain autograd on the token log-probs
    grpo = -((adv[:, None] * logp() * mask).sum(-1) / mask.sum(-1)).mean()
    g_grpo = torch.autograd.grad(grpo, list(policy.parameters()))
    assert abs(popi.item() - (-(adv.sum().item()) / K)) < 1e-6  # ρ = 1
    for a, b in zip(g_popi, g_grpo):
        assert a.abs().max() > 0
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
