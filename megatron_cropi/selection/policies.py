"""Selection policies: which prompts of the pool train the next stage.

* ``cropi``: top ``m`` by influence (cosine to each target set's direction; several targets fused by
  reciprocal rank or max). Prompts without a gradient (all rewards equal, or flagged) cannot be picked;
  when no prompt has one the stage uses the configured fallback policy and says so.
* the paper's baselines: ``full`` (the whole pool), ``random``, ``learnability`` (top ``m`` by
  ``p(1−p)`` with ``p`` β's offline pass rate; ties broken at random), ``pass_rate_band`` (random ``m``
  among prompts with ``lo ≤ p ≤ hi``).
* ``online_learnability`` (SPEED-RL style): top ``m`` by ``p(1−p)`` where ``p`` is the pass rate of a
  few fresh responses of the *current* policy θ_m; prompts that were not rolled out (``p`` NaN, when
  only a fraction of the pool is) cannot be picked. ``p(1−p)`` is the variance of a prompt's Bernoulli
  reward, largest at ``p = ½``, zero for prompts always or never solved (no GRPO gradient).

``m = int(ratio × |pool|)`` over the full pool every stage (re-selection allowed, as in the paper);
``exclude_previous`` removes earlier stages' picks from the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from megatron_cropi.config.loader import require
from megatron_cropi.selection.guard import GuardConfig, guard_candidates, guard_direction
from megatron_cropi.selection.scores import cosine_scores, fuse_max, fuse_reciprocal_rank, target_direction, top_m

__all__ = ["SelectionConfig", "Selection", "SelectionInputs", "SelectionError", "select", "selection_budget", "finish_selection",
           "learnability_top", "ranking_scores", "TargetPlan", "target_plan", "pool_directions", "uses_behaviour_rollouts", "COSINE_QUANTILES"]

COSINE_QUANTILES = (0.0, 0.5, 0.9, 1.0)
"""The quantiles of the first target's cosines a cropi selection's summary reports."""
POLICIES = ("cropi", "full", "random", "learnability", "online_learnability", "pass_rate_band")


def uses_behaviour_rollouts(policy: str) -> bool:
    """Whether ``policy`` works from behaviour rollouts (β's, or a refresh's): every policy but ``full``,
    ``random`` and ``online_learnability`` (which rolls the pool out at θ_m itself)."""
    return policy not in ("full", "random", "online_learnability")


class SelectionError(ValueError):
    """The selection cannot be made as configured (empty pool, ratio too small, no target...)."""


@dataclass(frozen=True, kw_only=True)
class SelectionConfig:
    """How each stage's training subset is chosen."""

    policy: Literal["cropi", "full", "random", "learnability", "online_learnability", "pass_rate_band"] = "cropi"
    """Selection policy (``online_learnability``: pass rates of the current policy, rolled out every stage
    with ``curriculum.online_samples`` responses per prompt)."""
    ratio: float = 0.1
    """Fraction of the pool selected per stage (the paper: 10%)."""
    fusion: Literal["reciprocal_rank", "max"] = "reciprocal_rank"
    """How several target sets' scores are combined."""
    max_target_prompts: int = 100
    """Target prompts averaged into each target direction (the paper: at most 100, at random)."""
    use_sign: bool = False
    """Cosine of sign-gradients instead of gradients."""
    pass_rate_band: tuple[float, float] = (0.2, 0.8)
    """``[lo, hi]`` for the pass_rate_band policy."""
    fallback: Literal["learnability", "random", "full", "error"] = "learnability"
    """Policy used when cropi has no prompt with a gradient; ``error`` stops the run instead."""
    exclude_previous: bool = False
    """Never pick a prompt an earlier stage picked."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """A guard set whose gradient cropi's picks must not conflict with (:mod:`.guard`); off by default."""

    def __post_init__(self):
        require(0 < self.ratio <= 1, "ratio", self.ratio, "must be in (0, 1]")
        require(1 <= self.max_target_prompts <= 1_000_000, "max_target_prompts", self.max_target_prompts,
                "must be between 1 and 1000000")
        lo, hi = self.pass_rate_band
        require(0 <= lo <= hi <= 1, "pass_rate_band", list(self.pass_rate_band), "must satisfy 0 <= lo <= hi <= 1")


@dataclass
class SelectionInputs:
    """What a policy may look at, for a pool of N prompts.

    Attributes:
        prompt_ids: ``[N]`` pool prompt ids (store-row order).
        pass_rates: ``[N]`` pass rates (behaviour or current policy).
        sources: ``[N]`` dataset / task family of each prompt.
        features: ``[N, k]`` projected pool gradients (cropi only).
        usable: ``[N]`` rows with a gradient (status done, nonzero).
        targets: ``{name: (features [M, k], usable [M])}`` per target set (cropi only).
        previous: prompt ids picked by earlier stages.
        guard: ``(features [U, k], usable [U])`` of the guard set (``selection.guard.source: check``).
        cosines: instead of ``features``, the pool's cosines computed where its features are
            (``scoring.scale_out``): ``{"target:<name>": [N], "guard": [N]}`` against the directions
            :func:`pool_directions` gives, ``-inf`` where not usable.
    """

    prompt_ids: Sequence[str]
    pass_rates: np.ndarray
    sources: Sequence[str]
    features: np.ndarray | None = None
    usable: np.ndarray | None = None
    targets: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    previous: set[str] = field(default_factory=set)
    guard: tuple[np.ndarray, np.ndarray] | None = None
    cosines: dict[str, np.ndarray] | None = None

    computed: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """Cosines :meth:`pool_cosine` computed from the features, by features, usable and direction
    (selection and the ranking ask for the same ones); not shared by ``dataclasses.replace`` copies."""

    def pool_cosine(self, name: str, direction: np.ndarray, use_sign: bool) -> np.ndarray:
        """``[N]`` cosines of the pool with ``direction`` (the one named ``name``): precomputed, or from the
        features, once per direction (read-only: it is handed to every caller that asks again; editing
        ``features`` or ``usable`` in place afterwards is not noticed, assigning new ones is)."""
        if self.features is None and self.cosines is not None:
            return self.cosines[name]
        key = (id(self.features), id(self.usable), name, bool(use_sign),
               np.asarray(direction, dtype=np.float64).tobytes())
        if key not in self.computed:
            scores = cosine_scores(self.features, self.usable, direction, use_sign=use_sign)
            scores.flags.writeable = False
            self.computed[key] = scores
        return self.computed[key]


@dataclass(frozen=True)
class TargetPlan:
    """What the small target and guard stores give selection, read once on rank 0 and shared.

    Attributes:
        directions: ``{"target:<name>": [k], "guard": [k]}`` (the guard's for ``selection.guard.source:
            check``), as :func:`~megatron_cropi.selection.policies.pool_directions` chooses them.
        targets: per target set with a gradient, the summary's ``target_prompts_used``,
            ``target_prompts`` and ``with_gradient``.
        skipped: target sets without any gradient, with the reason.
        guard_prompts_used: guard prompts averaged into the guard direction (None: no guard direction).
    """

    directions: dict[str, np.ndarray]
    targets: dict[str, dict]
    skipped: dict[str, str]
    guard_prompts_used: int | None = None


def target_plan(cfg: SelectionConfig, targets: dict[str, tuple[np.ndarray, np.ndarray]],
                guard: tuple[np.ndarray, np.ndarray] | None, *, seed: int) -> TargetPlan:
    """The :class:`TargetPlan` of the target sets ``{name: (features [M, k], usable [M])}`` and the
    check set ``guard`` (``(features [U, k], usable [U])`` or None), with ``select``'s seeds."""
    directions, info, skipped = {}, {}, {}
    for name, (tf, tu) in sorted(targets.items()):
        try:
            direction, chosen = target_direction(tf, tu, max_prompts=cfg.max_target_prompts, seed=seed)
        except ValueError as err:
            skipped[name] = str(err)
            continue
        directions[f"target:{name}"] = direction
        info[name] = {"target_prompts_used": int(chosen.size), "target_prompts": int(len(tu)),
                      "with_gradient": int(np.asarray(tu).sum())}
    used = None
    if guard is not None and cfg.guard.source == "check" and np.asarray(guard[1]).any():
        directions["guard"], chosen = guard_direction(cfg.guard, *guard, seed=seed)
        used = int(chosen.size)
    return TargetPlan(directions=directions, targets=info, skipped=skipped, guard_prompts_used=used)


def pool_directions(cfg: SelectionConfig, targets: dict[str, tuple[np.ndarray, np.ndarray]],
                    guard: tuple[np.ndarray, np.ndarray] | None, *, seed: int) -> dict[str, np.ndarray]:
    """The directions the pool's cosines are taken with: ``target:<name>`` for each target set with a
    gradient, and ``guard`` for a check-set guard; the same choice of prompts as :func:`select` makes."""
    return target_plan(cfg, targets, guard, seed=seed).directions


@dataclass
class Selection:
    """A stage's chosen prompts, best first, and how they were chosen."""

    stage: int
    policy: str
    rows: list[int]
    prompt_ids: list[str]
    scores: list[float]
    summary: dict

    def to_dict(self) -> dict:
        return {"stage": self.stage, "policy": self.policy, "rows": self.rows, "prompt_ids": self.prompt_ids,
                "scores": self.scores, "summary": self.summary}

    @classmethod
    def from_dict(cls, d: dict) -> "Selection":
        return cls(stage=d["stage"], policy=d["policy"], rows=list(d["rows"]), prompt_ids=list(d["prompt_ids"]),
                   scores=list(d["scores"]), summary=dict(d["summary"]))


def selection_budget(cfg: SelectionConfig, n: int) -> int:
    """``m = int(ratio × n)`` prompts for a pool of ``n``.

    Raises:
        SelectionError: an empty pool, or a ratio that selects nothing.
    """
    if n == 0:
        raise SelectionError("the pool is empty: nothing to select from (check data.pool and the rollout store)")
    m = int(cfg.ratio * n)
    if m == 0:
        raise SelectionError(f"selection.ratio={cfg.ratio} selects no prompt from a pool of {n}; "
                             f"use a ratio of at least {1 / n:.3g}")
    return m


def _random_tiebreak(keys: np.ndarray, candidates: np.ndarray, m: int, rng) -> np.ndarray:
    """Top ``m`` candidates by ``keys`` (descending), ties in random order."""
    shuffled = rng.permutation(candidates)
    order = shuffled[np.argsort(-keys[shuffled], kind="stable")]
    return order[:m]


def learnability_top(pass_rates: np.ndarray, candidates: np.ndarray, m: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Top ``m`` of ``candidates`` by learnability ``p(1−p)``, ties in random order (``rng``); candidates
    whose pass rate is NaN (not rolled out) are left out. Returns ``(rows, p(1−p) of the rows)``."""
    p = np.asarray(pass_rates, dtype=np.float64)
    keys = p * (1 - p)
    candidates = np.asarray(candidates, dtype=np.int64)
    candidates = candidates[np.isfinite(keys[candidates])]
    picked = _random_tiebreak(keys, candidates, m, rng)
    return picked, keys[picked]


def _cropi(cfg, inp: SelectionInputs, cand: np.ndarray, m: int, seed: int):
    """Fused cosine scores ``[N]`` (``-inf`` outside ``cand``), or None when no target set has a gradient;
    target sets without any gradient are skipped and named."""
    per_target, info, skipped = [], {}, {}
    for name, (tf, tu) in sorted(inp.targets.items()):
        try:
            direction, chosen = target_direction(tf, tu, max_prompts=cfg.max_target_prompts, seed=seed)
        except ValueError as err:
            skipped[name] = str(err)
            continue
        s = inp.pool_cosine(f"target:{name}", direction, cfg.use_sign)
        mask = np.full_like(s, -np.inf)
        mask[cand] = s[cand]
        per_target.append(mask)
        info[name] = {"target_prompts_used": int(chosen.size), "target_prompts": int(len(tu)),
                      "with_gradient": int(np.asarray(tu).sum())}
    if not per_target:
        return None, {"targets": info, "skipped_targets": skipped}
    fused = fuse_reciprocal_rank(per_target, m) if cfg.fusion == "reciprocal_rank" and len(per_target) > 1 \
        else (per_target[0] if len(per_target) == 1 else fuse_max(per_target))
    return fused, {"targets": info, "skipped_targets": skipped, "cosine": per_target}


def _guarded(cfg: SelectionConfig, inp: SelectionInputs, cand: np.ndarray, seed: int):
    """``cand`` after the guard's ``drop`` (all of it for ``demote``), the demoted rows, and the guard's summary.

    Raises:
        SelectionError: every candidate conflicts with the guard set (``drop``), or the guard set has no gradient.
    """
    guard = cfg.guard
    if guard.source == "check":
        if inp.guard is None:
            raise SelectionError("selection.guard.source is check, but the check set's features are missing")
        guard_features, guard_usable = inp.guard
    else:  # pool: the pool's own mean gradient (full-data GRPO's direction)
        guard_features, guard_usable = inp.features, inp.usable
    try:
        result = guard_candidates(guard, cand, inp.features, inp.usable, guard_features, guard_usable, seed=seed,
                                  pool_cosines=None if inp.cosines is None else inp.cosines.get("guard"))
    except ValueError as err:
        raise SelectionError(f"selection.guard (source {guard.source}): {err}") from None
    if guard.mode == "demote":
        return cand, set(cand[~result.keep].tolist()), result.summary
    kept = cand[result.keep]
    if kept.size == 0:
        raise SelectionError(f"selection.guard (source {guard.source}, threshold {guard.threshold}): every one of "
                             f"the {cand.size} candidates conflicts with the guard set; nothing selected (lower "
                             f"selection.guard.threshold, use mode demote, or turn the guard off)")
    result.summary["dropped"] = int(cand.size - kept.size)
    return kept, set(), result.summary


def _top_demoting(fused: np.ndarray, demoted: set[int], m: int) -> np.ndarray:
    """Top ``m`` finite rows of ``fused``: rows not in ``demoted`` first, each part best first."""
    order = top_m(fused, fused.size)
    if demoted:
        order = np.array([i for i in order if i not in demoted] + [i for i in order if i in demoted], dtype=np.int64)
    return order[:m]


def ranking_scores(cfg: SelectionConfig, inp: SelectionInputs, *, seed: int) -> np.ndarray:
    """``[N]`` every pool prompt's influence score, the max over target sets of its cosine with the set's
    direction (the directions ``select`` uses); ``-inf`` for prompts without a gradient. What the pool
    shortlist of the next stage ranks by (``influence/shortlist.py``)."""
    out = np.full(len(inp.prompt_ids), -np.inf)
    if (inp.features is None and inp.cosines is None) or inp.usable is None:
        return out
    for name, (tf, tu) in sorted(inp.targets.items()):
        try:
            direction, _ = target_direction(tf, tu, max_prompts=cfg.max_target_prompts, seed=seed)
        except ValueError:
            continue
        out = np.maximum(out, inp.pool_cosine(f"target:{name}", direction, cfg.use_sign))
    return out


def select(cfg: SelectionConfig, inp: SelectionInputs, *, stage: int, seed: int) -> Selection:
    """Choose stage ``stage``'s prompts; deterministic in ``seed``.

    Raises:
        SelectionError: empty pool, a ratio that selects nothing, cropi without targets, or no
            usable prompt with ``fallback: error``.
    """
    n = len(inp.prompt_ids)
    m = selection_budget(cfg, n)
    rng = np.random.default_rng([seed, stage])
    all_rows = np.arange(n)
    if cfg.exclude_previous and inp.previous:
        cand = np.array([i for i in all_rows if inp.prompt_ids[i] not in inp.previous], dtype=np.int64)
    else:
        cand = all_rows
    summary: dict = {"pool": n, "budget": m, "candidates": int(cand.size)}
    policy = cfg.policy
    p = np.asarray(inp.pass_rates, dtype=np.float64)
    picked = scores = None
    if policy == "cropi":
        if not inp.targets:
            raise SelectionError("policy cropi needs at least one target set (data.val), found none")
        usable = inp.usable if inp.usable is not None else np.zeros(n, bool)
        summary["zero_gradient_prompts"] = int((~usable).sum())
        why = None
        if not usable[cand].any():
            why = "no pool prompt had a gradient (every group's rewards were equal)"
        else:
            scored, demoted = cand[usable[cand]], set()
            if cfg.guard.enabled:
                scored, demoted, summary["guard"] = _guarded(cfg, inp, scored, seed)
            fused, extra = _cropi(cfg, inp, scored, m, seed)
            summary["targets"] = extra["targets"]
            if extra["skipped_targets"]:
                summary["skipped_targets"] = extra["skipped_targets"]
            if fused is None:
                why = "no target set had a prompt with a gradient"
            else:
                picked = _top_demoting(fused, demoted, m)
                scores = fused[picked]
                if demoted:
                    summary["guard"]["demoted_selected"] = int(sum(int(i) in demoted for i in picked))
        if why is not None:
            if cfg.fallback == "error":
                raise SelectionError(f"{why}; set selection.fallback to a baseline policy to continue")
            summary["fallback"] = f"{why}; used {cfg.fallback}"
            policy = cfg.fallback
    if policy == "cropi":
        if picked.size < m:
            summary["shortfall"] = f"only {picked.size} prompts had a gradient; selected all of them"
        fused_all = extra["cosine"][0]
        finite = fused_all[np.isfinite(fused_all)]
        if finite.size:
            summary["cosine_quantiles"] = {q: float(np.quantile(finite, q)) for q in COSINE_QUANTILES}
    elif policy == "full":
        picked, scores = cand, np.zeros(cand.size)
    elif policy == "random":
        picked = np.sort(rng.choice(cand, size=min(m, cand.size), replace=False))
        scores = np.zeros(picked.size)
    elif policy == "learnability":
        keys = p * (1 - p)
        picked = _random_tiebreak(keys, cand, m, rng)
        scores = keys[picked]
    elif policy == "online_learnability":
        rolled = int(np.isfinite(p[cand]).sum())
        if rolled == 0:
            raise SelectionError("online_learnability has no pass rate of the current policy for any candidate "
                                 "(the stage's pool rollouts are missing)")
        picked, scores = learnability_top(p, cand, m, rng)
        rolled_p = p[cand][np.isfinite(p[cand])]
        summary.update(rolled_out=rolled, rolled_out_mean_pass_rate=float(rolled_p.mean()),
                       rolled_out_zero_learnability=int(((rolled_p == 0) | (rolled_p == 1)).sum()))
        if picked.size < m:
            summary["shortfall"] = f"only {picked.size} candidates were rolled out; selected all of them"
    elif policy == "pass_rate_band":
        lo, hi = cfg.pass_rate_band
        band = cand[(p[cand] >= lo) & (p[cand] <= hi)]
        if band.size == 0:
            raise SelectionError(f"no prompt has a pass rate in [{lo}, {hi}]")
        picked = np.sort(rng.choice(band, size=min(m, band.size), replace=False))
        scores = p[picked]
    else:  # pragma: no cover - guarded by the config
        raise SelectionError(f"unknown policy {policy!r}")
    return finish_selection(stage, policy, picked, scores, inp, summary)


def finish_selection(stage: int, policy: str, picked: np.ndarray, scores: np.ndarray, inp: SelectionInputs,
                     summary: dict) -> Selection:
    """The :class:`Selection` of ``picked`` (rows of ``inp``, best first) with ``scores``; ``summary``
    gains the selected count, the overlap with earlier stages, the mean pass rate and the source mix."""
    picked = np.asarray(picked, dtype=np.int64)
    p = np.asarray(inp.pass_rates, dtype=np.float64)
    summary["selected"] = int(picked.size)
    summary["previous_overlap"] = int(sum(inp.prompt_ids[i] in inp.previous for i in picked))
    summary["mean_pass_rate"] = float(p[picked].mean()) if picked.size else 0.0
    mix: dict[str, int] = {}
    for i in picked:
        mix[inp.sources[i]] = mix.get(inp.sources[i], 0) + 1
    summary["source_mix"] = dict(sorted(mix.items(), key=lambda kv: -kv[1]))
    return Selection(stage=stage, policy=policy, rows=[int(i) for i in picked],
                     prompt_ids=[inp.prompt_ids[i] for i in picked], scores=[float(s) for s in scores], summary=summary)
