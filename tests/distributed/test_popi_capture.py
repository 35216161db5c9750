"""POPI per-prompt gradients captured under TP/PP equal the projection of plain autograd gradients."""

import hashlib

import numpy as np
import pytest
import torch

from megatron_cropi.testing.spawn import run_ranks

K, G, PROMPT, RESP, SEQ = 4, 5, 5, 6, 12


class NameSeededDense:
    """Test oracle projector: a Gaussian [k, numel] matrix per global parameter, seeded by its name."""

    def __init__(self, k, seed=0):
        self.k, self.seed, self._cache = k, seed, {}

    def _matrix(self, spec):
        if spec.global_name not in self._cache:
            s = int(hashlib.md5(f"{self.seed}:{spec.global_name}".encode()).hexdigest()[:8], 16)
            n = int(np.prod(spec.global_shape))
            self._cache[spec.global_name] = torch.randn(self.k, n, generator=torch.Generator().manual_seed(s))
        return self._cache[spec.global_name]

    def project(self, shard, spec):
        idx = torch.arange(int(np.prod(spec.global_shape))).view(spec.global_shape)[spec.global_slices()]
        cols = self._matrix(spec)[:, idx.reshape(-1)]
        return shard.reshape(shard.shape[0], -1).float() @ cols.T


def autograd_backward(model, group, groups, loss_cfg, seq=None):
    """The oracle's step: zero the grads, then plain autograd of one prompt's POPI loss (K responses
    padded to ``seq``) through ``model`` at TP = PP = 1, leaving its gradient in ``.grad``."""
    from megatron_cropi.model.logprobs import vocab_parallel_logprobs
    from megatron_cropi.model.schedule import causal_attention_mask
    from megatron_cropi.popi.batch import pack_microbatches
    from megatron_cropi.popi.loss import popi_group_losses

    seq = seq or SEQ
    mb = pack_microbatches([group], [0], prompts_per_microbatch=1, responses_per_prompt=K, seq_length=seq)[0]
    model.zero_grad()
    logits = model(input_ids=mb.tokens, position_ids=mb.position_ids, attention_mask=causal_attention_mask(seq, groups.device))
    logp = vocab_parallel_logprobs(logits, mb.labels, temperature=1.0)
    popi_group_losses(logp, mb.behaviour_logprobs, mb.mask, mb.rewards, mb.group_index, 1, loss_cfg)[0].backward()


def make_groups(vocab, seed=0, num=G, mixed=False):
    """``num`` prompts × K random responses; ``mixed``: no group has all-equal rewards (every oracle
    gradient non-zero)."""
    from megatron_cropi.records import PromptRecord, Response, RolloutGroup

    rng = np.random.default_rng(seed)
    out = []
    for i in range(num):
        prompt = PromptRecord(prompt_id=f"p{i}", token_ids=rng.integers(1, vocab, PROMPT).astype(np.int32), answer="")
        responses = []
        for _ in range(K):
            t = int(rng.integers(2, RESP + 1))
            responses.append(Response(rng.integers(1, vocab, t).astype(np.int32),
                                      (-rng.uniform(3.0, 6.0, t)).astype(np.float32)))
        rewards = rng.integers(0, 2, K).astype(np.float32)
        if i == 0:
            rewards[:] = [1, 0, 0, 1]
        if mixed and rewards.min() == rewards.max():
            rewards[0] = 1 - rewards[0]
        out.append(RolloutGroup(prompt, tuple(responses), rewards))
    return out


def _capture_worker(layouts, tied, preset="tiny"):
    import torch.distributed as dist

    from megatron_cropi.model.params import assemble_global_tensors
    from megatron_cropi.parallel import build_parallel_groups, destroy_parallel_groups, init_distributed
    from megatron_cropi.popi.batch import pack_microbatches
    from megatron_cropi.popi.capture import PopiCapture
    from megatron_cropi.popi.loss import PopiLossConfig
    from megatron_cropi.projection.base import ShardSpec
    from megatron_cropi.testing.tiny import build_tiny_model, tiny_model_config

    init_distributed()
    cfg = tiny_model_config(preset, tie_word_embeddings=tied)
    groups_data = make_groups(cfg.vocab_size)
    projector = NameSeededDense(k=64)
    loss_cfg = PopiLossConfig(clip_eps=None)
    results = {}

    # oracle: plain autograd per prompt at TP=1/PP=1, full gradient projected by global name
    g = build_parallel_groups(1, 1)
    model = build_tiny_model(cfg, g, seed=5)
    oracle = []
    for i in range(G):
        autograd_backward(model, groups_data[i], g, loss_cfg)
        full = assemble_global_tensors(model, g)
        oracle.append(sum(projector.project(v[None], ShardSpec.whole(n, v.shape))[0] for n, v in full.items()))
    results["oracle"] = torch.stack(oracle)
    destroy_parallel_groups()

    for tp, pp in layouts:
        g = build_parallel_groups(tp, pp)
        model = build_tiny_model(cfg, g, seed=5)
        for mode, ppm in (("per_prompt", 1), ("batched", 2)):
            mbs = pack_microbatches(groups_data, list(range(G)), prompts_per_microbatch=ppm, responses_per_prompt=K,
                                    seq_length=SEQ)
            out = PopiCapture(model, g, projector, mode=mode, loss_cfg=loss_cfg).run(mbs, G, K)
            results[(tp, pp, mode)] = (out.sketches, out.finite)
            # nothing is left behind: no gradients held, requires_grad restored
            assert all(p.grad is None for p in model.parameters())
            assert all(p.requires_grad for p in model.parameters())
        destroy_parallel_groups()
    return results if dist.get_rank() == 0 else None


def _check(results, layouts):
    oracle = results["oracle"]
    assert oracle.abs().max() > 0
    for tp, pp in layouts:
        for mode in ("per_prompt", "batched"):
            sk, finite = results[(tp, pp, mode)]
            assert finite.all(), (tp, pp, mode)
            err = ((sk - oracle).norm(dim=1) / oracle.norm(dim=1)).max().item()
            assert err < 1e-4, f"TP={tp} PP={pp} {mode}: relative error {err:.2e}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tied,preset", [(False, "tiny"), (True, "tiny"), (False, "tiny-qwen3")])
def test_capture_matches_autograd_oracle_tp_pp(tied, preset):
    """``tiny-qwen3``: q/k norms (replicated over TP, partial gradient per TP rank), head_dim ≠ hidden/heads."""
    layouts = [(1, 1), (2, 1), (1, 2), (2, 2)]
    results = run_ranks(_capture_worker, 4, args=(layouts, tied, preset), timeout_s=280)[0]
    _check(results, layouts)
