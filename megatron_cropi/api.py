"""CROPI selection in-process, for a framework that has a trainer (and a sampler) of its own.

    from megatron_cropi.api import CropiSelector

    selector = CropiSelector("run.yaml")                     # the config `cropi run` / `cropi rollout` used
    scores = selector.score("/ckpt/hf-step-200")              # {prompt_id: influence score}, whole pool
    chosen = selector.select(scores, budget=512)              # the 512 most influential prompt ids
    for rec in selector.records(chosen): ...                  # PromptRecord: text, answer, source, meta

``score`` does what ``cropi select`` does up to the selection: it loads the checkpoint (an HF directory,
or a GRPO checkpoint ``step_N`` saved in any TP/PP layout) into this process's layout, scores the stored
behaviour rollouts of the pool and the target sets (``{run.output_dir}/rollouts/``), and returns each
pool prompt's score: its cosine with the target direction, the max over target sets when there are
several, ``-inf`` for a prompt without a gradient (all its behaviour rewards equal). Feature stores go
where ``cropi select`` puts them (``{run.output_dir}/select/<step_N | hf-NAME>/``, or ``out``), so a
killed call resumes and a second call at the same checkpoint reads them back.

``select`` is the top ``budget`` prompts by score. With one target set it picks what ``cropi select``
picks for that budget (``selection.policy: cropi`` without a guard); with several, ``cropi select`` fuses
the sets by reciprocal rank instead of the max. Prompt ids are ``data.prompt_ids.prompt_id(text,
answer)``: the same in every process and on every machine, so a sampler can match them to its own rows.

Run it in one process, or under ``torchrun`` with the config's TP/PP layout (every rank calls every
method; each gets the same result). docs/api.md has a worked example of a custom sampler.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

from megatron_cropi.records import PromptRecord

__all__ = ["CropiSelector"]


class CropiSelector:
    """Score a prompt pool at a checkpoint and pick the most influential prompts.

    Args:
        config: a ``RunConfig``, or the path of its YAML file.
        overrides: ``key.path=value`` strings applied to a config file (as on the command line).
        out: where feature stores go (default ``{run.output_dir}/select/<checkpoint name>``).
    """

    def __init__(self, config, *, overrides: Sequence[str] = (), out: str | Path | None = None):
        if isinstance(config, (str, Path)):
            from megatron_cropi.run_config import load_run_config

            config = load_run_config(str(config), tuple(overrides), command="select")
        if config.scoring.scale_out:  # score() reads the pool's features on rank 0
            from megatron_cropi.config.loader import ConfigError

            raise ConfigError("scoring.scale_out", "true: CropiSelector.score returns every pool prompt's score "
                              "from rank 0's features, which scale-out scoring never gathers; use `cropi select` "
                              "or pass the override scoring.scale_out=false")
        self.cfg = config
        self.out = out
        self._live = None  # (groups, prompts, tokenizer): process groups are made once per process

    def _setup(self):
        if self._live is None:
            from megatron_cropi.wiring import setup_run

            self._live = setup_run(self.cfg)
        return self._live

    @property
    def pool(self) -> list[PromptRecord]:
        """The pool's prompts, as the config loads them."""
        return self._setup()[1].pool

    def score(self, checkpoint: str | Path, *, stage: int = 0) -> dict[str, float]:
        """``{prompt_id: score}`` of every pool prompt at ``checkpoint`` (see the module docstring).

        ``stage`` names the feature stores (``features/stage{stage}/``) in the output directory.

        Raises:
            RunInputError: the checkpoint is neither kind, a behaviour store is missing, or ``out`` holds
                feature stores of another checkpoint.
        """
        from megatron_cropi.commands.select import behaviour_stores, checkpoint_tag, claim_output, score_at_checkpoint
        from megatron_cropi.curriculum.steps import selection_inputs
        from megatron_cropi.layout import RunLayout
        from megatron_cropi.selection.policies import ranking_scores
        from megatron_cropi.utils.rank_zero import on_rank0

        groups, prompts, tokenizer = self._setup()
        run = RunLayout(self.cfg.run.output_dir)
        target = RunLayout(self.out or run.root / "select" / checkpoint_tag(checkpoint))
        stores = behaviour_stores(self.cfg, run, prompts.targets)
        on_rank0(lambda: claim_output(target.root, checkpoint))
        features, _ = score_at_checkpoint(self.cfg, checkpoint, groups=groups, tokenizer=tokenizer, stores=stores,
                                          out=target, stage=stage)

        def read() -> dict[str, float]:
            inputs = selection_inputs(prompts.pool, pool_rollouts=stores["pool"], features=features, previous=set())
            values = ranking_scores(self.cfg.selection, inputs, seed=self.cfg.run.seed)
            return {pid: float(v) for pid, v in zip(inputs.prompt_ids, values)}

        return on_rank0(read)

    @staticmethod
    def select(scores: Mapping[str, float], budget: int) -> list[str]:
        """The ``budget`` prompt ids of highest score, best first (ties by prompt id); prompts whose score
        is not finite (no gradient) are never chosen, so fewer may come back.

        Raises:
            ValueError: ``budget`` < 1.
        """
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        finite = [(pid, s) for pid, s in scores.items() if math.isfinite(s)]
        finite.sort(key=lambda kv: (-kv[1], kv[0]))
        return [pid for pid, _ in finite[:budget]]

    def records(self, prompt_ids: Sequence[str]) -> list[PromptRecord]:
        """The pool's records of ``prompt_ids``, in that order.

        Raises:
            KeyError: an id the pool does not hold.
        """
        by_id = {p.prompt_id: p for p in self.pool}
        missing = [pid for pid in prompt_ids if pid not in by_id]
        if missing:
            raise KeyError(f"{len(missing)} prompt ids are not in the pool (e.g. {missing[0]})")
        return [by_id[pid] for pid in prompt_ids]
