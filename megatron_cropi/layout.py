"""Every path of a run directory, in one place.

``cropi run`` (the curriculum), ``cropi train`` (plain GRPO, under ``train/``), ``cropi score`` and
``cropi rollout`` all write under ``run.output_dir``; this class is the only code that spells out where::

    state.json                               where the run is; the config its finished work was made with
    warmup/hf/                               the supervised warm-up's policy (β), HF format
    rollouts/{pool,target-<name>}/           trajectory stores of β (written once)
    rollouts/stage{m}/pool/                  the pool rolled out at θ_m (online_learnability)
    features/stage{m}/{pool,target-<name>}/  feature stores at θ_m (``features/<tag>/`` for ``cropi score``)
    selections/stage{m}.json                 each stage's chosen prompts (under scoring.scale_out the head:
    selections/stage{m}.parts/part{r}.json     summary only, and each rank's picks: selection/stored.py)
    rankings/stage{m}.json                   every pool prompt's carried influence score (shortlist; not scale-out)
    background/stage{m}/                     curriculum.background_scoring: θ_m (HF), the job, its result and log
    background/{config.yaml,stop}              an external scorer's config (the run's, resolved) and its stop
    checkpoints/step_N/                      GRPO checkpoints (model, optimizer, RNG, data position)
    metrics/eval.jsonl                       evaluations against GRPO step
    tensorboard/                             TensorBoard event files
    reports/stage{m}.{json,md}               per-stage reports
    summary.{json,md}, accuracy.png          the run's summary and plot
    final_hf/                                the final policy, HF format
    train/{checkpoints,tensorboard,eval.json}  ``cropi train``'s own outputs

Paths only: nothing here creates or reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunLayout"]


@dataclass(frozen=True)
class RunLayout:
    """The paths of the run rooted at ``root`` (``run.output_dir``)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def warmup_hf(self) -> Path:
        return self.root / "warmup" / "hf"

    @property
    def rollouts_root(self) -> Path:
        return self.root / "rollouts"

    def rollouts(self, name: str) -> Path:
        """Trajectory store of the prompt set ``name`` (``pool``, ``target-<family>``, or a split name)."""
        return self.rollouts_root / name

    def stage_rollouts(self, m: int, name: str) -> Path:
        """Trajectory store of set ``name`` rolled out by the stage-``m`` policy θ_m (``rollouts/stage{m}/name``)."""
        return self.rollouts_root / f"stage{m}" / name

    @property
    def features_root(self) -> Path:
        return self.root / "features"

    def features(self, tag: str | int, name: str) -> Path:
        """Feature store of set ``name``; ``tag`` is a stage number (``stage{m}``) or ``cropi score``'s tag."""
        return self.features_root / (f"stage{tag}" if isinstance(tag, int) else tag) / name

    def selection(self, m: int) -> Path:
        return self.root / "selections" / f"stage{m}.json"

    def ranking(self, m: int) -> Path:
        """The carried influence score of every pool prompt after stage ``m`` (``influence/shortlist.py``)."""
        return self.root / "rankings" / f"stage{m}.json"

    def background(self, m: int) -> Path:
        """Stage ``m``'s background scoring job (``curriculum.background_scoring``): ``policy_hf/`` (θ_m when
        it is not β's directory), ``job.json``, ``result.json``, ``log``."""
        return self.root / "background" / f"stage{m}"

    @property
    def background_root(self) -> Path:
        """``background/``: with ``curriculum.background_scorer: external`` also ``config.yaml`` (the run's
        resolved config, which the scoring job must match) and ``stop`` (written when the run has finished)."""
        return self.root / "background"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval_log(self) -> Path:
        return self.root / "metrics" / "eval.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def stage_report(self, m: int, suffix: str = "json") -> Path:
        return self.reports / f"stage{m}.{suffix}"

    def summary(self, suffix: str = "json") -> Path:
        return self.root / f"summary.{suffix}"

    @property
    def accuracy_plot(self) -> Path:
        return self.root / "accuracy.png"

    @property
    def final_hf(self) -> Path:
        return self.root / "final_hf"

    @property
    def train(self) -> "RunLayout":
        """``cropi train``'s own tree (``train/checkpoints``, ``train/tensorboard``, ``train/eval.json``)."""
        return RunLayout(self.root / "train")

    @property
    def train_history(self) -> Path:
        return self.root / "eval.json"
