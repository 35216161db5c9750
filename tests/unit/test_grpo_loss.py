"""The GRPO loss: a hand-computed example, each clipping regime, the KL estimators, step-global
normalisation over micro-batches, and gradients against finite differences on a tiny model (float64)."""

import math

import pytest
import torch

from megatron_cropi.config.loader import ConfigError, from_dict
from megatron_cropi.grpo.config import GrpoConfig, GrpoLossConfig
from megatron_cropi.grpo.loss import (LossNormalizer, aggregate, finalize_stats, grpo_loss, kl_penalty,
                                      policy_gradient_terms, truncated_is_weights)
from megatron_cropi.model.logprobs import vocab_parallel_entropy, vocab_parallel_logprobs

# Two sequences, three positions; the last position of sequence 0 is not a response token.
LOGP = torch.tensor([[-1.0, -0.5, -2.0], [-0.2, -1.5, -0.7]], dtype=torch.float64)
OLD = torch.tensor([[-1.2, -0.5, -1.0], [-0.2, -1.0, -0.7]], dtype=torch.float64)
REF = torch.tensor([[-1.1, -0.7, 0.0], [-0.4, -1.5, -0.5]], dtype=torch.float64)
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
ADV = torch.tensor([1.0, -0.5], dtype=torch.float64)
CFG = GrpoLossConfig(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0, kl_coef=0.1, kl_type="k1",
                     entropy_coef=0.0)


def test_hand_computed_example():
    # seq 0 (A = +1): ratios e^0.2 = 1.2214028 (inside [0.8, 1.28]) and 1 → pg = −1.2214028, −1.
    # seq 1 (A = −0.5): ratios 1, e^−0.5 = 0.6065307, 1 → −A·ρ = 0.5, 0.3032653, 0.5; the clipped term
    #   −A·clip(0.6065, 0.8, 1.28) = 0.4 is larger, so token 1 is clipped: pg = 0.5, 0.4, 0.5.
    # k1 KL, d = log π − log π_ref: 0.1, 0.2 | 0.2, 0, −0.2 → Σ = 0.3, weighted by 0.1 → 0.03.
    pg_sum = -math.exp(0.2) - 1.0 + 0.5 + 0.4 + 0.5
    norm = LossNormalizer(tokens=5, sequences=2)
    loss, sums = grpo_loss(LOGP, OLD, ADV, MASK, CFG, norm, ref_logprobs=REF)
    assert loss.item() == pytest.approx((pg_sum + 0.03) / 5, abs=1e-12)
    assert sums["pg_loss"].item() == pytest.approx(pg_sum, abs=1e-12)
    assert sums["kl"].item() == pytest.approx(0.3, abs=1e-12)
    assert sums["clipped"].item() == 1 and sums["clipped_dual"].item() == 0
    assert sums["tokens"].item() == 5 and sums["sequences"].item() == 2
    stats = finalize_stats({k: v.item() for k, v in sums.items()})
    assert stats["clip_frac"] == pytest.approx(0.2) and stats["kl"] == pytest.approx(0.06)

    seq_cfg = GrpoLossConfig(**{**CFG.__dict__, "loss_agg": "seq-mean-token-mean"})
    loss_seq, _ = grpo_loss(LOGP, OLD, ADV, MASK, seq_cfg, norm, ref_logprobs=REF)
    seq0 = (-math.exp(0.2) - 1.0 + 0.1 * 0.3) / 2
    seq1 = (1.4 + 0.1 * 0.0) / 3
    assert loss_seq.item() == pytest.approx((seq0 + seq1) / 2, abs=1e-12)


def test_clip_higher_and_dual_clip():
    one = torch.ones(1, 1, dtype=torch.float64)
    lp = torch.log(torch.tensor([[1.25]], dtype=torch.float64))
    narrow = GrpoLossConfig(clip_eps_low=0.2, clip_eps_high=0.2)
    wide = GrpoLossConfig(clip_eps_low=0.2, clip_eps_high=0.28)
    pg, _, clipped, _ = policy_gradient_terms(lp, 0 * one, one[0], narrow)
    assert pg.item() == pytest.approx(-1.2) and clipped.item()  # capped at 1 + 0.2
    pg, _, clipped, _ = policy_gradient_terms(lp, 0 * one, one[0], wide)
    assert pg.item() == pytest.approx(-1.25) and not clipped.item()  # clip-higher lets 1.25 through
    # a negative advantage with a huge ratio: −A·ρ = 7.39 is bounded by the dual clip at −A·c = 3
    lp = torch.tensor([[2.0]], dtype=torch.float64)
    pg, ratio, _, dual = policy_gradient_terms(lp, 0 * one, -one[0], wide)
    assert ratio.item() == pytest.approx(math.exp(2.0)) and pg.item() == pytest.approx(3.0) and dual.item()
    no_dual = GrpoLossConfig(dual_clip_c=None)
    pg, _, _, dual = policy_gradient_terms(lp, 0 * one, -one[0], no_dual)
    assert pg.item() == pytest.approx(math.exp(2.0)) and not dual.item()


def test_kl_estimators():
    lp = torch.tensor([0.1, -0.3, 0.0], dtype=torch.float64)
    ref = torch.zeros(3, dtype=torch.float64)
    assert kl_penalty(lp, ref, "k1").tolist() == pytest.approx([0.1, -0.3, 0.0])
    assert kl_penalty(lp, ref, "k2").tolist() == pytest.approx([0.005, 0.045, 0.0])
    k3 = [math.exp(-d) + d - 1 for d in (0.1, -0.3, 0.0)]
    assert kl_penalty(lp, ref, "low_var_kl").tolist() == pytest.approx(k3)
    assert (kl_penalty(lp, ref, "low_var_kl") >= 0).all()  # k3 is non-negative, k1 is not
    assert kl_penalty(torch.tensor([-50.0]), torch.tensor([0.0]), "low_var_kl").item() == 10.0  # clamped
    with pytest.raises(ValueError, match="kl_type"):
        kl_penalty(lp, ref, "k4")


def test_microbatch_losses_sum_to_the_step_loss():
    gen = torch.Generator().manual_seed(0)
    n, t = 6, 5
    lp = (-torch.rand(n, t, generator=gen, dtype=torch.float64)).requires_grad_()
    old = lp.detach() + 0.3 * torch.randn(n, t, generator=gen, dtype=torch.float64)
    mask = (torch.rand(n, t, generator=gen) > 0.3).double()
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    cfg = GrpoLossConfig(kl_coef=0.0, entropy_coef=0.0)
    for agg in ("token-mean", "seq-mean-token-mean"):
        c = GrpoLossConfig(**{**cfg.__dict__, "loss_agg": agg})
        whole, _ = grpo_loss(lp, old, adv, mask, c, LossNormalizer.from_masks([mask]))
        (g_whole,) = torch.autograd.grad(whole, lp)
        parts = [slice(0, 2), slice(2, 3), slice(3, 6)]
        norm = LossNormalizer.from_masks([mask[p] for p in parts])  # counted before the schedule
        split = sum(grpo_loss(lp[p], old[p], adv[p], mask[p], c, norm)[0] for p in parts)
        (g_split,) = torch.autograd.grad(split, lp)
        assert split.item() == pytest.approx(whole.item(), abs=1e-12)
        assert torch.allclose(g_split, g_whole, atol=1e-14)


def test_padding_rows_and_bad_inputs():
    norm = LossNormalizer(tokens=1, sequences=1)
    lp = torch.tensor([[-1.0, float("-inf")]], dtype=torch.float64)  # -inf off the mask must not leak
    loss, _ = grpo_loss(lp, torch.tensor([[-1.0, 0.0]], dtype=torch.float64), torch.tensor([1.0]),
                        torch.tensor([[1.0, 0.0]]), GrpoLossConfig(kl_coef=0.0, entropy_coef=0.0), norm)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-1.0)
    assert aggregate(torch.ones(2, 2), torch.zeros(2, 2), "token-mean", LossNormalizer(0, 0)).item() == 0.0
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(LOGP, OLD, ADV, MASK, CFG, norm)
    with pytest.raises(ValueError, match="same"):
        grpo_loss(LOGP, OLD[:, :2], ADV, MASK, CFG, norm, ref_logprobs=REF)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"loss\.clip_eps_low: must be in \[0, 1\)"):
        from_dict(GrpoConfig, {"loss": {"clip_eps_low": 1.5}})
    with pytest.raises(ConfigError, match=r"optim\.min_lr"):
        from_dict(GrpoConfig, {"optim": {"lr": 1e-4, "min_lr": 1e-3}})
    with pytest.raises(ConfigError, match=r"loss\.kl_type"):
        from_dict(GrpoConfig, {"loss": {"kl_type": "k3"}})
    with pytest.raises(ConfigError, match=r"updates_per_step"):
        from_dict(GrpoConfig, {"prompts_per_step": 4, "updates_per_step": 8})


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab=7, hidden=4):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.emb = torch.nn.Parameter(0.5 * torch.randn(vocab, hidden, generator=gen, dtype=torch.float64))
        self.w = torch.nn.Parameter(0.5 * torch.randn(hidden, hidden, generator=gen, dtype=torch.float64))
        self.out = torch.nn.Parameter(0.5 * torch.randn(vocab, hidden, generator=gen, dtype=torch.float64))

    def forward(self, tokens):
        return torch.tanh(self.emb[tokens] @ self.w) @ self.out.T  # [N, T, V]


@pytest.mark.parametrize("kl_type,agg", [("low_var_kl", "token-mean"), ("k2", "seq-mean-token-mean"), ("k1", "token-mean")])
def test_gradients_match_finite_differences(kl_type, agg):
    model = _TinyLM()
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 7, (4, 6), generator=gen)
    labels = torch.randint(0, 7, (4, 6), generator=gen)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]],
                        dtype=torch.float64)
    adv = torch.tensor([1.2, -0.7, 0.4, 0.0], dtype=torch.float64)
    temperature = 0.9

    def logprobs_entropy(logits):
        # float64 log-softmax: vocab_parallel_logprobs/entropy compute in fp32 (checked against these below)
        logq = torch.log_softmax(logits / temperature, dim=-1)
        return logq.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(logq.exp() * logq).sum(-1)

    with torch.no_grad():
        base, ent0 = logprobs_entropy(model(tokens))
        assert torch.allclose(vocab_parallel_logprobs(model(tokens), labels, temperature=temperature).double(), base,
                              atol=1e-6)
        assert torch.allclose(vocab_parallel_entropy(model(tokens), temperature=temperature).double(), ent0, atol=1e-6)
    # old and reference policies a little away from θ, so ratios ≠ 1 (some clipped) and KL ≠ 0
    old = base + 0.15 * torch.randn(base.shape, generator=gen, dtype=torch.float64)
    ref = base + 0.2 * torch.randn(base.shape, generator=gen, dtype=torch.float64)
    cfg = GrpoLossConfig(clip_eps_low=0.1, clip_eps_high=0.15, kl_coef=0.3, kl_type=kl_type, entropy_coef=0.05,
                         loss_agg=agg)
    norm = LossNormalizer.from_masks([mask])

    def loss_fn():
        logp, ent = logprobs_entropy(model(tokens))
        return grpo_loss(logp, old, adv, mask, cfg, norm, ref_logprobs=ref, entropy=ent)

    loss, sums = loss_fn()
    assert 0 < sums["clipped"].item() < sums["tokens"].item()  # both regimes are exercised
    grads = torch.autograd.grad(loss, list(model.parameters()))
    h = 1e-6
    for p, g in zip(model.parameters(), grads):
        fd = torch.zeros_like(p)
        with torch.no_grad():
            for i in range(p.numel()):
                orig = p.view(-1)[i].item()
                p.view(-1)[i] = orig + h
                up = loss_fn()[0].item()
                p.view(-1)[i] = orig - h
                down = loss_fn()[0].item()
                p.view(-1)[i] = orig
                fd.view(-1)[i] = (up - down) / (2 * h)
        assert g.abs().max() > 1e-4
        assert torch.allclose(g, fd, atol=1e-7, rtol=1e-5), f"max |autograd − FD| = {(g - fd).abs().max():.2e}"


# Truncated importance sampling of the engine/trainer mismatch (issue 14). The current log-probs equal
# the trainer's old ones (ratio 1, no PPO clip), so pg = −A per token before the TIS weight.
ROLLOUT = torch.tensor([[-1.0, -0.5, -3.0], [-0.2, -2.0, -0.7]], dtype=torch.float64)


def test_truncated_is_weights_hand_computed():
    # δ = old − rollout = [[−0.2, 0, 2], [0, 1, 0]]; C = 2 caps e^2 and e^1
    w = truncated_is_weights(OLD, ROLLOUT, 2.0)
    want = torch.tensor([[math.exp(-0.2), 1.0, 2.0], [1.0, 2.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(w, want, atol=1e-12, rtol=0)
    assert not w.requires_grad
    assert truncated_is_weights(OLD, ROLLOUT, 10.0)[1, 1].item() == pytest.approx(math.e)


def test_tis_weights_the_policy_gradient_and_logs_the_mismatch():
    cfg = GrpoLossConfig(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip_c=3.0, kl_coef=0.0, entropy_coef=0.0,
                         tis_imp_ratio_cap=2.0)
    norm = LossNormalizer(tokens=5, sequences=2)
    logp = OLD.clone().requires_grad_(True)
    loss, sums = grpo_loss(logp, OLD, ADV, MASK, cfg, norm, rollout_logprobs=ROLLOUT)
    # seq 0 (A = 1): −e^−0.2 − 1; seq 1 (A = −0.5): 0.5·1 + 0.5·2 + 0.5·1 = 2 (the masked token is out)
    pg_sum = -math.exp(-0.2) - 1.0 + 2.0
    assert loss.item() == pytest.approx(pg_sum / 5, abs=1e-12)
    assert sums["pg_loss"].item() == pytest.approx(pg_sum, abs=1e-12)
    assert sums["tis_weight"].item() == pytest.approx(math.exp(-0.2) + 1.0 + 1.0 + 2.0 + 1.0, abs=1e-12)
    assert sums["tis_capped"].item() == 1  # the capped token under the mask is not counted
    assert sums["rollout_abs_diff"].item() == pytest.approx(1.2, abs=1e-12)
    # k3: e^δ − 1 − δ summed over the response tokens
    assert sums["rollout_kl"].item() == pytest.approx(math.exp(-0.2) - 0.8 + math.e - 2.0, abs=1e-12)
    # the weight is a constant: ∂L/∂log π = −A·w·ρ/N at ρ = 1
    loss.backward()
    want = torch.tensor([[-math.exp(-0.2), -1.0, 0.0], [0.5, 1.0, 0.5]], dtype=torch.float64) / 5
    assert torch.allclose(logp.grad, want, atol=1e-12, rtol=0)
    stats = finalize_stats({k: v.item() for k, v in sums.items()})
    assert stats["rollout_logprob_abs_diff"] == pytest.approx(0.24) and stats["tis_capped_frac"] == pytest.approx(0.2)

    # off (the default): the same call leaves the loss alone but still measures the gap
    off = GrpoLossConfig(**{**cfg.__dict__, "tis_imp_ratio_cap": None})
    loss_off, sums_off = grpo_loss(OLD, OLD, ADV, MASK, off, norm, rollout_logprobs=ROLLOUT)
    assert loss_off.item() == pytest.approx((-2.0 + 1.5) / 5, abs=1e-12)
    assert sums_off["rollout_abs_diff"].item() == pytest.approx(1.2) and sums_off["tis_weight"].item() == 0
    with pytest.raises(ValueError, match="tis_imp_ratio_cap needs rollout_logprobs"):
        grpo_loss(OLD, OLD, ADV, MASK, cfg, norm)


def test_tis_config_is_off_by_default_and_checked():
    assert GrpoLossConfig().tis_imp_ratio_cap is None
    with pytest.raises(ConfigError, match="tis_imp_ratio_cap"):
        from_dict(GrpoLossConfig, {"tis_imp_ratio_cap": 0.0})
    with pytest.raises(ConfigError, match="tis_imp_ratio_cap.*old_logprobs: recompute"):
        from_dict(GrpoConfig, {"loss": {"tis_imp_ratio_cap": 2.0}})
    cfg = from_dict(GrpoConfig, {"old_logprobs": "recompute", "loss": {"tis_imp_ratio_cap": 2.0}})
    assert cfg.loss.tis_imp_ratio_cap == 2.0
    assert GrpoConfig().drop_zero_variance_groups is True  # the documented default (see GrpoConfig)
