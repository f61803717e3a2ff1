"""Checkpoint folders: complete-or-absent, newest found by step, pruned only after a new one is complete."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = [
    "COMPLETE_MARKER",
    "CheckpointError",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "prune_checkpoints",
    "save_checkpoint",
]

PREFIX = "checkpoint-"


class CheckpointError(OSError):
    """A checkpoint could not be written (typically a full disk); nothing partial was left behind."""


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

    A run killed at any point leaves every earlier checkpoint intact (and at most an unmarked temporary folder). A
    write that fails (a full disk: torch reports it as ``RuntimeError: ... file write failed``) removes the partial
    folder, so it cannot fill the disk further, and raises ``CheckpointError`` saying what happened.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    partial = output_dir / f".{PREFIX}{step}.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
        if accelerator.is_main_process:
            (partial / COMPLETE_MARKER).write_text(str(step))
    except (OSError, RuntimeError) as err:
        shutil.rmtree(partial, ignore_errors=True)
        earlier = latest_checkpoint(output_dir)
        raise CheckpointError(
            f"could not write the checkpoint at step {step} in '{output_dir}' ({_reason(err)}); the partial folder "
            f"was removed and {f'{earlier.name} is intact' if earlier else 'no earlier checkpoint exists'}. Free "
            "some space (or choose another --output_dir), then resume with --resume_from_checkpoint latest"
        ) from err
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()
    return text[-1][:200] if text else type(err).__name__
