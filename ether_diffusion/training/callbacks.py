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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .task import SampleKind

__all__ = ["Callback", "CallbackList", "Preparation", "ValidationEvent"]


@dataclass
class Preparation:
    """What the run is doing before its first step; ``done``/``total`` when it is countable (class images)."""

    message: str
    done: int | None = None
    total: int | None = None


@dataclass
class ValidationEvent:
    """Images sampled during or after training: ``kind`` says what they show (``SampleKind``: the step-0 baseline,
    a preview, the final file reloaded), ``paths`` where they were written (one file per image, or one grid)."""

    step: int
    kind: SampleKind
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
