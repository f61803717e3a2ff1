"""The training loop's checkpoints: accelerate's state (the task's file, optimizer, schedule, RNG states) in a
checkpoint folder of the package's convention (``ether_diffusion/checkpoints.py``: complete or absent, pruned after)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..checkpoints import COMPLETE_MARKER, partial_folder, prune_checkpoints, write_failed

__all__ = ["save_checkpoint"]


def save_checkpoint(accelerator, output_dir: str | Path, step: int, total_limit: int | None = None) -> Path:
    """``accelerator.save_state`` into a temporary folder, mark it complete, rename it into place, then prune.

    A run killed at any point leaves every earlier checkpoint intact (and at most an unmarked temporary folder). A
    write that fails (a full disk: torch reports it as ``RuntimeError: ... file write failed``) removes the partial
    folder, so it cannot fill the disk further, and raises ``CheckpointError`` saying what happened.
    """
    output_dir = Path(output_dir)
    final, partial = partial_folder(output_dir, step)
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            (partial / COMPLETE_MARKER).write_text(str(step))
    except (OSError, RuntimeError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise write_failed(output_dir, step, err) from err
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final
