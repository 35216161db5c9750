"""How batched capture cuts per-prompt gradients into bounded blocks: pure arithmetic, no torch.

A micro-batch holds ``G`` prompts of ``K`` sequences of ``S`` positions. The per-prompt weight gradient
of a linear layer with a local weight ``[out, in]`` is ``dW_g = Σ_{n∈g} Σ_s dY[s,n]ᵀ X[s,n]``; formed
whole for every prompt it is ``[G, out, in]`` float32, from float32 copies of its factors
``[G, K·S, in]`` and ``[G, K·S, out]``. At Qwen2.5-7B, TP 4, one prompt of 8 × 4608 tokens, the output
layer's ``dW`` alone is 0.55 GB and its factors 6.1 GB. :mod:`megatron_cropi.popi.per_sample` forms
them in blocks instead, each at most ``B`` = :data:`BLOCK_BYTES` (unless one row of one prompt is
larger), projects a block and frees it before the next:

* **linear** (one row range of the weight at a time: the whole local weight, or each half of a SwiGLU
  ``linear_fc1`` shard): ``c = clamp(⌊B / 4·rows·in⌋, 1, G)`` prompts, ``r = clamp(⌊B / 4·c·in⌋, 1, rows)``
  rows, ``[c, r, in]`` float32 accumulated over chunks of ``t = clamp(⌊B / 4·c·K·(in + r)⌋, 1, S)``
  positions: float32 copies ``[c, K·t, in]`` of X and ``[c, K·t, r]`` of dY (a bias adds ``[c, r]``);
* **embedding** (local vocabulary ``V_l`` rows of ``h``): ``c = clamp(⌊B / 4·V_l·h⌋, 1, G)``,
  ``r = clamp(⌊B / 4·c·h⌋, 1, V_l)`` rows ``[c·r + 1, h]`` (one spare row takes the ids outside the
  block), summed from chunks ``[c, K·t, h]`` of dY with ``t = clamp(⌊B / 4·c·K·h⌋, 1, S)``;
* **norm** (``h`` features, ``m`` vectors per position: 1, or the heads of a q/k norm): all ``G`` prompts
  (``[G, h]`` is small), float32 copies ``[G, K·t·m, h]`` of its input and of dY with
  ``t = clamp(⌊B / 8·G·K·m·h⌋, 1, S)``.

The plans are pure functions of the shapes, so :mod:`megatron_cropi.memory_capture` counts the same
blocks the capture forms (``tests/unit/test_memory_capture.py`` measures them).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BLOCK_BYTES", "BlockPlan", "linear_plan", "embedding_plan", "norm_plan"]

BLOCK_BYTES = 256 * 1024 ** 2
"""``B``: float32 bytes of one block of per-prompt gradient, and of one chunk of its factors."""

F32 = 4


def _clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(n, hi))


@dataclass(frozen=True)
class BlockPlan:
    """One module's blocks: ``prompts`` (c) at a time, ``rows`` (r) of its gradient at a time, its
    factors ``steps`` (t) sequence positions at a time; ``nbytes`` the float32 bytes alive at once."""

    prompts: int
    rows: int
    steps: int
    grad_bytes: int
    factor_bytes: int

    @property
    def nbytes(self) -> int:
        return self.grad_bytes + self.factor_bytes


def linear_plan(*, groups: int, responses: int, seq: int, rows: int, cols: int, bias: bool = False,
                block_bytes: int = BLOCK_BYTES) -> BlockPlan:
    """Blocks of a ``[rows, cols]`` row range of a linear weight (module docstring)."""
    c = _clamp(block_bytes // (F32 * rows * cols), 1, groups)
    r = _clamp(block_bytes // (F32 * c * cols), 1, rows)
    t = _clamp(block_bytes // (F32 * c * responses * (cols + r)), 1, seq)
    grad = F32 * c * r * (cols + (1 if bias else 0))
    return BlockPlan(c, r, t, grad, F32 * c * responses * t * (cols + r))


def embedding_plan(*, groups: int, responses: int, seq: int, vocab_local: int, hidden: int,
                   block_bytes: int = BLOCK_BYTES) -> BlockPlan:
    """Blocks of the ``[V_l, h]`` per-prompt embedding gradient (module docstring)."""
    c = _clamp(block_bytes // (F32 * vocab_local * hidden), 1, groups)
    r = _clamp(block_bytes // (F32 * c * hidden), 1, vocab_local)
    t = _clamp(block_bytes // (F32 * c * responses * hidden), 1, seq)
    return BlockPlan(c, r, t, F32 * (c * r + 1) * hidden, F32 * c * responses * t * hidden)


def norm_plan(*, groups: int, responses: int, seq: int, hidden: int, vectors: int = 1,
              bias: bool = False, block_bytes: int = BLOCK_BYTES) -> BlockPlan:
    """Chunks of a norm's input and output gradient (module docstring); ``[G, h]`` (and ``dβ``) whole."""
    t = _clamp(block_bytes // (2 * F32 * groups * responses * vectors * hidden), 1, seq)
    grad = F32 * groups * hidden * (2 if bias else 1)
    return BlockPlan(groups, 1, t, grad, 2 * F32 * groups * responses * t * vectors * hidden)
