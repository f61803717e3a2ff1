"""Watching and steering a run: a ``Callback`` has one method per event of the loop; override the ones you need.

Events, in order::

    on_prepare(message)                      loading the model, drawing class images (with progress), ...
    on_train_start(total_steps, start_step)  the loop is about to run (start_step > 0 when resumed)
    on_step(step, logs)                      after every optimisation step; logs: loss, lr, ...
    on_validation(event)                     baseline at step 0, previews, and the final samples of the saved file
    on_checkpoint(step, path)                a complete checkpoint folder was written
    on_save(path)                            the trained adapter file was written
    on_train_end(result)                     the run finished (also after a stop)

``should_stop()`` is asked after every step (and between preparation phases): returning True stops the run with
the adapter so far saved and a checkpoint to resume from.

``AdapterSnapshots(task, {step: path})`` saves the adapter as it is after each of those steps (points along one run:
the benchmark's trade-off curves), atomically, without training anything more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "AdapterSnapshots",
    "Callback",
    "CallbackList",
    "Preparation",
    "SnapshotMissing",
    "ValidationEvent",
    "missing_snapshots",
]


@dataclass
class Preparation:
    """What the run is doing before its first step; ``done``/``total`` when it is countable (class images)."""

    message: str
    done: int | None = None
    total: int | None = None


@dataclass
class ValidationEvent:
    """Images sampled during or after training.

    ``kind``: ``"baseline"`` (step 0, the base model: what training is judged against), ``"preview"`` (adapter as
    trained so far) or ``"final"`` (the saved file reloaded into a fresh pipeline). ``paths``: where they were
    written (one file per image, or one grid).
    """

    step: int
    kind: str
    images: list
    paths: list[Path] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)


class Callback:
    def on_prepare(self, preparation: Preparation) -> None:
        pass

    def on_train_start(self, total_steps: int, start_step: int) -> None:
        pass

    def on_step(self, step: int, logs: dict[str, float]) -> None:
        pass

    def on_validation(self, event: ValidationEvent) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        pass

    def on_save(self, path: Path) -> None:
        pass

    def on_train_end(self, result) -> None:
        pass

    def should_stop(self) -> bool:
        return False


class CallbackList(Callback):
    """Several callbacks as one: every event goes to each; the run stops when any asks it to."""

    def __init__(self, callbacks=()):
        self.callbacks = [c for c in callbacks if c is not None]

    def _each(self, event: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(*args)

    def on_prepare(self, preparation):
        self._each("on_prepare", preparation)

    def on_train_start(self, total_steps, start_step):
        self._each("on_train_start", total_steps, start_step)

    def on_step(self, step, logs):
        self._each("on_step", step, logs)

    def on_validation(self, event):
        self._each("on_validation", event)

    def on_checkpoint(self, step, path):
        self._each("on_checkpoint", step, path)

    def on_save(self, path):
        self._each("on_save", path)

    def on_train_end(self, result):
        self._each("on_train_end", result)

    def should_stop(self) -> bool:
        return any(callback.should_stop() for callback in self.callbacks)


def missing_snapshots(paths: dict[int, Path], up_to_step: int) -> list[int]:
    """The steps ≤ ``up_to_step`` of ``paths`` whose file is absent (a run past them cannot write them any more)."""
    return sorted(step for step, path in paths.items() if step <= up_to_step and not Path(path).is_file())


class AdapterSnapshots(Callback):
    """Writes the task's artifact (``task.save``: one adapter file, atomically) at the end of each step in ``paths``
    (``{step: file}``), on the main process: the adapter as it was at that step of this run.

    A resumed run writes the snapshots of the steps it trains again (a snapshot after the checkpoint it resumes from
    is rewritten with the same tensors); those before that checkpoint must already exist, else ``SnapshotMissing``
    is raised before the first step. A snapshot of non-finite tensors is not written: the run is stopped with the
    loop's ``TrainingDivergedError``, as a checkpoint would stop it.
    """

    def __init__(self, task, paths: dict[int, Path]):
        self.task = task
        self.paths = {int(step): Path(path) for step, path in paths.items()}
        self.written: list[int] = []

    def on_train_start(self, total_steps, start_step):
        missing = missing_snapshots(self.paths, start_step)
        if missing:
            raise SnapshotMissing(
                f"the run resumes from step {start_step}, past the adapter snapshot(s) of step(s) {missing}, whose "
                f"file(s) are gone ({self.paths[missing[0]]}); they cannot be made without training again: delete "
                f"the run's training folder ({self.task.config.output_dir}) to retrain it from step 0"
            )
        late = [step for step in self.paths if step >= total_steps]
        if late:
            raise ValueError(f"snapshot steps {sorted(late)} are not before the run's last step ({total_steps})")

    def on_step(self, step, logs):
        path = self.paths.get(step)
        if path is None or not _is_main_process():
            return
        import torch

        from .trainer import TrainingDivergedError

        params = [p for group in self.task.parameter_groups() for p in group["params"]]
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise TrainingDivergedError(
                f"the trained vectors hold NaN or infinite values at step {step}, before the snapshot {path}; "
                "nothing was saved from this state"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        self.task.save(path, {"steps": str(step), "snapshot": "true"})
        self.written.append(step)

    def on_train_end(self, result):
        self.task = None  # the task holds the models: do not keep them alive past the run


class SnapshotMissing(RuntimeError):
    """A resumed run is past a snapshot step whose file is gone."""


def _is_main_process() -> bool:
    """Whether this is the process that writes files (accelerate's main process; the only one without a launcher)."""
    from accelerate import PartialState

    return PartialState().is_main_process
