"""Transient memory of POPI gradient capture on one pipeline stage: pure arithmetic on the shapes.

What :mod:`megatron_cropi.memory` charges to scoring besides activations and logits (its ``capture``
line), on one TP rank of a stage. Every figure is computed from the same block plans the capture
uses (:mod:`megatron_cropi.popi.blocks`), so it counts the tensors that exist, not a rule of thumb;
``tests/unit/test_memory_capture.py`` measures them on a tiny model.

**batched** (``G`` prompts × ``K`` responses of ``s`` positions per micro-batch, weights frozen): the
hooks run one module at a time during the backward and free their blocks before the next, so the
transient is the largest module's, over the modules of the stage:

* a linear's row range ``[rows, cols]`` (QKV, output projection, each half of SwiGLU fc1, fc2, and on
  the last stage the output layer ``[V/t, h]``): :func:`~megatron_cropi.popi.blocks.linear_plan`;
* the embedding ``[V/t, h]`` on the first stage: :func:`~megatron_cropi.popi.blocks.embedding_plan`;
* the norms (``h``; q/k norms ``head_dim`` over this rank's heads): :func:`~megatron_cropi.popi.blocks.norm_plan`;

plus, under sequence parallelism, the all-gathered tensor a hook holds meanwhile (a column-parallel
linear's input ``e·s·N·cols``, a row-parallel linear's or the embedding's output gradient
``e·s·N·h``; ``N = G·K``, ``e`` the activation bytes), and the projection's own temporaries for one
block (:func:`projection_temporary_bytes`).

**per_prompt**: Megatron's own weight gradient of the stage's largest parameter (the vocabulary matrix
on the first and last stage, else fc1), in the parameter dtype, while it is projected.

Not counted: integer index tensors (8 bytes per position of a chunk, against ``4·h`` per position of
its float32 factors), the autograd engine's own output gradients (backward working memory, outside
every term of the estimate).
"""

from __future__ import annotations

from megatron_cropi.popi.blocks import BLOCK_BYTES, BlockPlan, embedding_plan, linear_plan, norm_plan

__all__ = ["stage_linears", "projection_temporary_bytes", "capture_transient_bytes"]


def stage_linears(m, tp: int, *, last_stage: bool) -> dict[str, tuple[int, int, str]]:
    """``{name: (rows, cols, "column"|"row")}``: the local weight row ranges capture forms per-prompt
    gradients of, one TP rank of a stage (``m``: a :class:`~megatron_cropi.memory.ModelShape`)."""
    q, kv = m.heads * m.head_dim, 2 * m.query_groups * m.head_dim
    out = {
        "linear_qkv": ((q + kv) // tp, m.hidden, "column"),
        "linear_proj": (m.hidden, q // tp, "row"),
        # gated (SwiGLU): each TP shard of fc1 is [gate; up], two row ranges of f/t (model/params.py)
        "linear_fc1": (m.ffn // tp, m.hidden, "column"),
        "linear_fc2": (m.hidden, m.ffn // tp, "row"),
    }
    if last_stage:  # untied, or tied (the output layer's hook forms the embedding's [V/t, h] too)
        out["output_layer"] = (m.vocab // tp, m.hidden, "column")
    return out


def projection_temporary_bytes(kind: str, *, batch: int, numel: int, keep_ratio: float, sjlt_s: int = 1) -> int:
    """Temporaries of projecting one ``[batch, numel]`` block on CUDA.

    ``sjlt`` runs one pass there (:mod:`megatron_cropi.projection.sjlt`): the ``m = q·numel`` kept
    values gathered in float32 (``4·B·m``; at ``q = 1`` the scaled copy instead), each pass's signs
    (float32) and slots (int64) ``12·m``, and for ``s > 1`` one more scaled copy ``4·B·m``. The other
    backends chunk their gathers (bounded by their chunk sizes, not modelled: 0).
    """
    if kind != "sjlt":
        return 0
    m = int(keep_ratio * numel) if keep_ratio < 1 else numel
    return 4 * batch * m * (2 if sjlt_s > 1 else 1) + 12 * m


def _module_bytes(plan: BlockPlan, *, gathered: int, kind: str, numel_per_prompt: int, keep_ratio: float,
                  sjlt_s: int) -> dict:
    proj = projection_temporary_bytes(kind, batch=plan.prompts, numel=numel_per_prompt, keep_ratio=keep_ratio,
                                      sjlt_s=sjlt_s)
    return {"gradient_block": plan.grad_bytes, "factors": plan.factor_bytes, "sequence_gather": gathered,
            "projection": proj}


def capture_transient_bytes(m, *, mode: str, tp: int, seq: int, groups: int, responses: int, act_bytes: int,
                            param_bytes: int, first_stage: bool, last_stage: bool, sequence_parallel: bool = False,
                            projection: str = "sjlt", keep_ratio: float = 1.0, sjlt_s: int = 1,
                            block_bytes: int = BLOCK_BYTES) -> dict:
    """Capture's transient bytes on one TP rank of a stage (module docstring).

    Args:
        m: a :class:`~megatron_cropi.memory.ModelShape`.
        mode: ``batched`` or ``per_prompt``.
        seq, groups, responses: ``s``, ``G``, ``K`` of a scoring micro-batch (``per_prompt``: G = 1).
        act_bytes, param_bytes: bytes of an activation and of a parameter.
        first_stage, last_stage: the stage holds the embedding / the output layer.
        projection, keep_ratio, sjlt_s: ``projection.kind``, ``.keep_ratio``, ``.sjlt_s``.
        block_bytes: :data:`~megatron_cropi.popi.blocks.BLOCK_BYTES`.

    Returns:
        ``{"bytes": the peak, "module": the module that reaches it, "terms": its parts}``.
    """
    linears = stage_linears(m, tp, last_stage=last_stage)
    proj = dict(kind=projection, keep_ratio=keep_ratio, sjlt_s=sjlt_s)
    if mode == "per_prompt":
        sizes = {n: rows * cols * (2 if n == "linear_fc1" and m.gated else 1) for n, (rows, cols, _) in linears.items()}
        if first_stage:
            sizes["embedding"] = m.vocab // tp * m.hidden
        name = max(sizes, key=sizes.get)
        piece = sizes[name] // 2 if name == "linear_fc1" and m.gated else sizes[name]  # projected half by half
        terms = {"parameter_gradient": param_bytes * sizes[name],
                 "projection": projection_temporary_bytes(batch=1, numel=piece, **proj)}
        return {"bytes": sum(terms.values()), "module": name, "terms": terms}
    if mode != "batched":
        raise ValueError(f"mode must be 'batched' or 'per_prompt', got {mode!r}")
    n_seq = groups * responses
    sp_seq = seq // tp if sequence_parallel else seq  # what a norm sees
    plan = dict(groups=groups, responses=responses, block_bytes=block_bytes)
    candidates = {}
    for name, (rows, cols, side) in linears.items():
        p = linear_plan(seq=seq, rows=rows, cols=cols, **plan)
        gathered = act_bytes * seq * n_seq * (cols if side == "column" else rows) if sequence_parallel else 0
        candidates[name] = _module_bytes(p, gathered=gathered, numel_per_prompt=p.rows * cols, **proj)
    if first_stage:
        p = embedding_plan(seq=seq, vocab_local=m.vocab // tp, hidden=m.hidden, **plan)
        gathered = act_bytes * seq * n_seq * m.hidden if sequence_parallel else 0
        candidates["embedding"] = _module_bytes(p, gathered=gathered, numel_per_prompt=p.rows * m.hidden, **proj)
    norms = {"norm": (m.hidden, 1)}
    if getattr(m, "qk_norm", False):
        norms.update(q_layernorm=(m.head_dim, m.heads // tp), k_layernorm=(m.head_dim, m.query_groups // tp))
    for name, (h, vectors) in norms.items():
        # q/k norms act after QKV's gather: all positions; the others on this rank's shard under SP
        p = norm_plan(seq=sp_seq if name == "norm" else seq, hidden=h, vectors=vectors, **plan)
        candidates[name] = _module_bytes(p, gathered=0, numel_per_prompt=h, **proj)
    name = max(candidates, key=lambda n: sum(candidates[n].values()))
    return {"bytes": sum(candidates[name].values()), "module": name, "terms": candidates[name]}
