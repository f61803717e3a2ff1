"""Checkpoint folders, by one convention for every writer (the training loop's accelerate state, the tiny world's
pretraining): a folder ``checkpoint-<step>`` is complete or absent (written as ``.checkpoint-<step>.partial``, marked
with ``COMPLETE_MARKER``, then renamed), the newest is found by its step, and the oldest are pruned only after a new
one is complete. Standard library only."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = [
    "COMPLETE_MARKER",
    "CheckpointError",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "partial_folder",
    "prune_checkpoints",
    "write_failed",
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


def partial_folder(output_dir: str | Path, step: int) -> tuple[Path, Path]:
    """``(final, partial)``: where checkpoint ``step`` ends up, and the folder it is written into first."""
    output_dir = Path(output_dir)
    return output_dir / f"{PREFIX}{step}", output_dir / f".{PREFIX}{step}.partial"


def write_failed(output_dir: str | Path, step: int, err: BaseException) -> CheckpointError:
    """The error of a checkpoint write that failed (typically a full disk), once its partial folder is removed."""
    earlier = latest_checkpoint(output_dir)
    return CheckpointError(
        f"could not write the checkpoint at step {step} in '{output_dir}' ({_reason(err)}); the partial folder "
        f"was removed and {f'{earlier.name} is intact' if earlier else 'no earlier checkpoint exists'}. Free "
        "some space (or choose another --output_dir), then resume with --resume_from_checkpoint latest"
    )


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = str(err).strip().splitlines()
    return text[-1][:200] if text else type(err).__name__
