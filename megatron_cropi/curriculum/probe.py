"""The projection probe: how well the stage's features rank prompts, against full exact scoring.

On a probe set of pool prompts (and the target set's prompts that build its direction), the exact
per-prompt POPI gradients are captured with an identity projector at the same checkpoint the features
were made at, with *full scoring*: every parameter and every stored response, whatever the stage's
scoring options (``last_layers``, ``include_params``, ``max_responses_per_prompt``, ``truncate_backward``).
The probe compares the cosines to the target direction, the stage's features vs exact: Spearman,
Pearson, precision@10% (overlap of the two top-10% sets) and mean |Δcos|. Its figures are thus the
quality cost of the projection *and* of the cheaper scoring options together. It runs only when the
model's parameters fit ``curriculum.probe_max_params`` (exact gradients are ``[n, params]``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from megatron_cropi.influence.feature_store import DONE
from megatron_cropi.influence.sharded_store import load_feature_store
from megatron_cropi.influence.scorer import scored_layouts
from megatron_cropi.influence.stores import MemoryFeatureSink, PolicyScorer, score_store
from megatron_cropi.projection.exact import ExactProjector
from megatron_cropi.selection.scores import cosine_scores, target_direction

__all__ = ["spearman", "probe_projection_quality"]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two score vectors (NaN for fewer than 3 items)."""
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1]) if a.size > 2 else float("nan")


def probe_projection_quality(m: int, features: dict[str, Path], scorer: PolicyScorer, *, stores: dict[str, Path],
                             probe_prompts: int, max_params: int, max_target_prompts: int, seed: int) -> dict:
    """Projected vs exact cosines to the first target set's direction (see the module docstring).

    Args:
        features: ``{set name: feature store}`` of stage ``m``.
        stores: ``{set name: trajectory store}`` the features were scored from.
        scorer: the policy at θ_m, as the features were scored.
        probe_prompts: pool prompts in the probe (``curriculum.probe_prompts``; 0 skips the probe).

    Returns:
        The probe's figures (on global rank 0; ``{}`` elsewhere), or ``{"skipped": why}``.
    """
    if probe_prompts <= 0 or not features:
        return {"skipped": "no probe set (curriculum.probe_prompts: 0) or no features"}
    full_cfg = dataclasses.replace(scorer.cfg, last_layers=0, include_params=(), exclude_params=(),
                                   max_responses_per_prompt=0, truncate_backward=False)
    full = PolicyScorer(scorer.model, scorer.groups, scorer.projector, full_cfg,
                        projection_seed=scorer.projection_seed, checkpoint_step=scorer.checkpoint_step,
                        pad_id=scorer.pad_id)
    layouts = scored_layouts(scorer.model, scorer.groups, full_cfg)
    exact_projector = ExactProjector.for_layouts(layouts.values(), scorer.groups)
    if exact_projector.k > max_params:
        return {"skipped": f"{exact_projector.k} parameters exceed curriculum.probe_max_params"}
    target_name = sorted(n for n in features if n.startswith("target-"))[0]
    vecs = {}
    for name in ("pool", target_name):
        fs = load_feature_store(features[name])
        usable = np.flatnonzero(fs.statuses() == DONE)
        if usable.size < 3:
            return {"skipped": f"{name} has {usable.size} prompts with a gradient (need 3)"}
        if name == "pool":
            rng = np.random.default_rng([seed, m, len(name)])
            rows = np.sort(rng.permutation(usable)[:probe_prompts])
        else:
            rows = np.sort(target_direction(fs.matrix(), fs.statuses() == DONE, max_prompts=max_target_prompts,
                                            seed=seed)[1])
        exact = MemoryFeatureSink(len(rows), exact_projector.k)
        score_store(stores[name], exact, full, rows=rows, projector=exact_projector)
        vecs[name] = (fs.read_rows(rows), exact.features)
    if scorer.groups.rank != 0:
        return {}
    pool_projected, pool_exact = vecs["pool"]
    target_projected, target_exact = vecs[target_name]
    ok = np.ones(len(pool_projected), bool)
    c_proj = cosine_scores(pool_projected, ok, target_projected.mean(0))
    c_exact = cosine_scores(pool_exact, ok, target_exact.mean(0))
    top = max(1, len(c_proj) // 10)
    best_projected, best_exact = set(np.argsort(-c_proj)[:top]), set(np.argsort(-c_exact)[:top])
    return {"probe_prompts": int(len(c_proj)), "target": target_name,
            "spearman": spearman(c_proj, c_exact), "pearson": float(np.corrcoef(c_proj, c_exact)[0, 1]),
            "precision_at_10pct": len(best_projected & best_exact) / top,
            "mean_abs_cosine_error": float(np.mean(np.abs(c_proj - c_exact))),
            "reference": "exact gradients of every parameter on every stored response"}
