"""Checkpoint folders: complete-or-absent, newest found by step, pruned only after a new one is complete."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = [
    "COMPLETE_MARKER",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "save_checkpoint",
]

PREFIX = "checkpoint-"
COMPLETE_MARKER = "checkpoint_complete"


def checkpoint_step(path: str | Path) -> int:
    return int(Path(path).name[len(PREFIX) :])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder left by a run killed mid-save has no marker and is skipped."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        p
        for p in output_dir.iterdir()
        if p.is_dir()
        and p.name.startswith(PREFIX)
        and p.name[len(PREFIX) :].isdigit()
        and (p / COMPLETE_MARKER).is_file()
    ]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most ``total_limit`` remain."""
    if total_limit is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - total_limit)]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def save_checkpoint(accelerator, output_dir: str | Path, step: int, total_limit: int | None = None) -> Path:
    """``accelerator.save_state`` into a temporary folder, mark it complete, rename it into place, then prune.

    A run killed at any point leaves every earlier checkpoint intact (and at most an unmarked temporary folder).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    partial = output_dir / f".{PREFIX}{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        (partial / COMPLETE_MARKER).write_text(str(step))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final
