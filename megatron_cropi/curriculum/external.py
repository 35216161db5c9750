"""External trainer stages (``curriculum.trainer.kind: external``): the user's command trains each stage.

For stage m the controller scores and selects as always, then, instead of GRPO steps:

    selections/stage{m}.parquet, .jsonl   the selection as verl / slime datasets (rank 0, atomically)
    command                               ``curriculum.trainer.command`` with its placeholders filled in,
                                          in a shell on global rank 0 (output: external/stage{m}.log);
                                          the other ranks wait, polling rank 0 every few seconds
    check                                 ``checkpoint_out`` holds config.json matching the model,
                                          every tensor the model needs with its shape, all finite
    load                                  θ_{m+1} into the running policy (``GrpoTrainer.load_hf``); its
                                          step counter is set to (m+1)·T, the step the stage ends at
    evaluate, mark ``stage{m}/train`` done

``{checkpoint_in}`` is θ_m's HF directory: β's (``warmup/hf`` or ``rollout.checkpoint``; a seeded random
init is exported to ``external/initial_hf`` first), then stage m−1's ``checkpoint_out``.

Resume: a restarted run loads the checkpoint of the last stage whose training is recorded done; a stage
not recorded done re-runs its command only if its ``checkpoint_out`` is missing or fails the check
(a command killed half-way is re-run; resuming inside it is the command's business).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import torch

from megatron_cropi.curriculum.exports import export_selection
from megatron_cropi.selection.policies import Selection
from megatron_cropi.utils.rank_zero import on_rank0, share_from_rank0
from megatron_cropi.wiring import RunInputError

__all__ = ["ExternalStageError", "hf_checkpoint_problem", "run_command", "train_stage", "resume"]

# torchrun's variables: a command started from a launched controller must not join its process group
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
                "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE")


class ExternalStageError(RunInputError):
    """An external stage's command failed, or left no usable checkpoint."""


def hf_checkpoint_problem(path: str | Path, model_cfg, *, fused_norms: bool = False) -> str | None:
    """Why the HF directory ``path`` cannot be loaded as the policy ``model_cfg`` describes, or None.

    Checks, reading every tensor once: ``config.json`` is there and its dimensions are the model's,
    every tensor the model needs is there with its shape (and none it would not use), all values finite.
    """
    from megatron_cropi.checkpoint import GPTDimensions, HFCheckpointReader, check_checkpoint_matches

    path = Path(path)
    if not (path / "config.json").is_file():
        return f"{path / 'config.json'} does not exist"
    try:
        reader = HFCheckpointReader(path)
        check_checkpoint_matches(reader, GPTDimensions.from_model_config(model_cfg), fused_norms=fused_norms)
        for name in sorted(reader.names()):
            tensor = reader.get(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"tensor {name!r} has {int((~torch.isfinite(tensor)).sum())} non-finite values"
    except Exception as err:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable; say why
        return f"{type(err).__name__}: {err}"
    return None


def run_command(command: str, *, log_path: Path, poll_s: float = 2.0) -> int:
    """Run ``command`` in a shell on global rank 0 and return its exit status on every rank.

    Its stdout and stderr are appended to ``log_path``. The other ranks poll rank 0 every ``poll_s``
    seconds instead of blocking in one collective (a stage may outlast the collective timeout)."""
    proc = None
    if torch.distributed.get_rank() == 0:
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"\n$ {command}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(command, shell=True, stdout=log, stderr=subprocess.STDOUT, env=env)
            except OSError as err:
                proc = err
    while True:
        status = None
        if isinstance(proc, OSError):
            status = ("error", str(proc))
        elif proc is not None:
            deadline = time.monotonic() + poll_s
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            status = None if proc.poll() is None else ("exit", proc.returncode)
        status = share_from_rank0(status)
        if status is not None:
            if status[0] == "error":
                raise ExternalStageError(f"could not start the external command {command!r}: {status[1]}")
            return int(status[1])


def _log_tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def _checkpoint_in(ctl, stage: int) -> str:
    """θ_stage's HF directory: β's (exported first when β is a random init), or the previous stage's output."""
    cfg = ctl.cfg
    if stage > 0:
        return str(Path(cfg.curriculum.trainer.checkpoint_dir(cfg.run.output_dir, stage - 1)).resolve())
    if ctl.runtime.hf_dir:
        return str(Path(ctl.runtime.hf_dir).resolve())
    from megatron_cropi.checkpoint import save_model_as_hf

    initial = ctl.layout.root / "external" / "initial_hf"
    if not on_rank0(lambda: (initial / "config.json").is_file()):
        save_model_as_hf(ctl.runtime.trainer.ddp, ctl.groups, cfg.model, initial, overwrite=True)
    return str(initial.resolve())


def _problem(ctl, path: Path) -> str | None:
    from megatron_cropi.checkpoint import uses_fused_norm_names

    fused = uses_fused_norm_names(ctl.runtime.model)
    return on_rank0(lambda: hf_checkpoint_problem(path, ctl.cfg.model, fused_norms=fused))


def _load(ctl, stage: int, path: Path) -> None:
    """θ_{stage+1} from ``path`` into the running policy, its step counter at the stage's last step."""
    trainer = ctl.runtime.trainer
    trainer.load_hf(path)
    # the stage stands for steps m·T .. (m+1)·T: later stages' checks (refresh, online rollouts),
    # feature headers and evaluation records are keyed by this step
    trainer.step_count = (stage + 1) * ctl.cfg.curriculum.steps_per_stage


def train_stage(ctl, stage: int, selection: Selection) -> None:
    """Stage ``stage`` by the external command (see the module docstring); marks ``stage{m}/train`` done."""
    cfg = ctl.cfg
    ctl.require_stage_start(stage, "external training")
    if stage == 0:
        ctl.evaluate()
    out = Path(cfg.curriculum.trainer.checkpoint_dir(cfg.run.output_dir, stage)).resolve()
    problem, ran, seconds = _problem(ctl, out), False, 0.0
    if problem is not None:
        parquet, jsonl = on_rank0(lambda: export_selection(cfg, ctl.layout, stage, ctl.prompts.pool, selection))
        command = cfg.curriculum.trainer.command.format(
            selection_parquet=Path(parquet).resolve(), selection_jsonl=Path(jsonl).resolve(),
            checkpoint_in=_checkpoint_in(ctl, stage), checkpoint_out=out, stage=stage)
        log_path = ctl.layout.root / "external" / f"stage{stage}.log"
        ctl.log(f"[external] stage {stage}: {command}")
        t0 = time.perf_counter()
        rc = run_command(command, log_path=log_path)
        seconds, ran = time.perf_counter() - t0, True
        ctl.charge("training", seconds)
        if rc != 0:
            raise ExternalStageError(f"stage {stage}: the external command exited with status {rc}: {command}\n"
                                     f"(last output, {log_path}):\n{on_rank0(lambda: _log_tail(log_path))}")
        problem = _problem(ctl, out)
        if problem is not None:
            raise ExternalStageError(f"stage {stage}: the external command succeeded but its checkpoint {out} is "
                                     f"not usable: {problem}")
    else:
        ctl.log(f"[external] stage {stage}: {out} is there and valid; the command is not run again")
    _load(ctl, stage, out)
    ctl.evaluate()
    ctl.mark_done(f"stage{stage}/train", step=ctl.runtime.trainer.step_count, checkpoint=str(out), ran_command=ran,
                  seconds=seconds)


def resume(ctl) -> None:
    """Load the checkpoint of the last stage whose external training is recorded done (if any)."""
    cfg = ctl.cfg
    done = [m for m in range(cfg.curriculum.stages) if ctl.is_done(f"stage{m}/train")]
    if not done:
        return
    stage = max(done)
    out = Path(cfg.curriculum.trainer.checkpoint_dir(cfg.run.output_dir, stage)).resolve()
    problem = _problem(ctl, out)
    if problem is not None:
        raise ExternalStageError(f"stage {stage}'s training is recorded done, but its checkpoint {out} is not "
                                 f"usable any more: {problem}")
    _load(ctl, stage, out)
    ctl.log(f"[resume] from the external checkpoint of stage {stage} ({out}, step {ctl.runtime.trainer.step_count})")
