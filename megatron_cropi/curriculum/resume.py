"""Where a restarted ``cropi run`` picks GRPO up: the latest checkpoint and the prompt set it was made with.

A checkpoint holds the data position in its stage's prompt set (``grpo/data.py``), so the set must be in
place before it loads: the stage's selection, or, for a stage that scored in the background
(``curriculum.background_scoring``), the whole pool up to the recorded switch and the selection after it
(:func:`~.background_stage.prompts_in_force`).
"""

from __future__ import annotations

from megatron_cropi.curriculum import background_stage, external, steps
from megatron_cropi.records import PromptRecord
from megatron_cropi.selection.policies import Selection
from megatron_cropi.utils.rank_zero import on_rank0, share_from_rank0

__all__ = ["resume_prompts", "resume_training"]


def resume_prompts(controller, stage: int, step: int, selection: Selection | None) -> list[PromptRecord] | None:
    """The prompt set of a checkpoint at ``step`` in stage ``stage`` (None: no set recorded)."""
    pool = controller.prompts.pool
    selected = steps.selected_prompts(pool, selection) if selection is not None else None
    if not background_stage.uses_background(controller.cfg, stage):
        return selected
    select_step = f"stage{stage}/select"
    if not controller.is_done(select_step):  # the scorer had not finished: the stage was on the pool so far
        return list(pool)
    switch_step = controller.state.info(select_step).get("switch_step")
    return background_stage.prompts_in_force(pool, selected, switch_step, step)


def resume_training(controller) -> None:
    """Load the latest GRPO checkpoint (if any) with its stage's prompt set for the data position."""
    from megatron_cropi.checkpoint.dist_ckpt import latest_checkpoint, read_checkpoint_meta

    if controller.cfg.curriculum.trainer.kind == "external":  # θ of the last stage the user's command trained
        return external.resume(controller)
    # rank 0 reads the directory and every rank acts on what it found (a shared filesystem may
    # show a new checkpoint to some nodes later than to others)
    layout = controller.layout
    ckpt = share_from_rank0(latest_checkpoint(layout.checkpoints) if controller.is_rank0 else None)
    if ckpt is None:
        return
    trainer = controller.runtime.trainer
    step = int(read_checkpoint_meta(ckpt)["step"])
    stage = max(step - 1, 0) // max(controller.cfg.curriculum.steps_per_stage, 1)
    selection = on_rank0(lambda: steps.read_selection(layout.selection(stage)))
    prompts = resume_prompts(controller, stage, step, selection)
    if prompts is not None:
        trainer.set_prompts(prompts)
    trainer.load(ckpt)
    on_rank0(lambda: controller.eval_log.truncate_after(step))
    controller.log(f"[resume] from {ckpt.name} (step {step}, stage {stage})")
