"""The task interface: what a kind of training (DreamBooth, control, SDXL, ...) tells the loop.

The loop (``Trainer``) owns everything generic: accelerate, the optimizer and schedule, checkpoints and exact
resume, validation timing, callbacks, the final save and teardown. A task owns the models and the data:

    setup(run)                      load the frozen models, add the adapters (the run gives device and dtype)
    parameter_groups()              what trains: [{"params": [...], "lr": ...}, ...]
    trainable_modules()             the modules holding those parameters (wrapped for data parallel by the loop)
    dataset(run)                    the training data (may draw class images first)
    loss(batch, run)                (loss, {name: value}) for one batch
    samples(run, kind)              validation images: kind "baseline" (step 0), "preview", or "final"
    save(path, extra)               the artifact users get (an adapter file); also each checkpoint's copy
    load_checkpoint(path)           restore the trained tensors from such a file (exact resume)
    model_card(result)              optional: a README for the output folder

A task is constructed from its run configuration (``RunConfig`` subclass) and trained with
``Trainer(task, callbacks).train()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import RunConfig

__all__ = ["Run", "Samples", "Task"]


@dataclass
class Run:
    """What the loop hands a task: the accelerator and the choices it made."""

    accelerator: object
    weight_dtype: torch.dtype
    noise_generator: torch.Generator
    prepared: dict[str, torch.nn.Module] = field(default_factory=dict)  # name -> module wrapped for data parallel

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def module(self, name: str, fallback: torch.nn.Module) -> torch.nn.Module:
        """The prepared (data-parallel) wrapper of ``name`` if it trains, else ``fallback`` itself."""
        return self.prepared.get(name, fallback)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32)


@dataclass
class Samples:
    """Images to show; ``columns`` makes the loop write one grid (rows of ``columns``) instead of one file each."""

    images: list
    prompts: list[str] = field(default_factory=list)
    columns: int | None = None


class Task(ABC):
    #: recorded in checkpoints and adapter files
    name: str = "task"
    #: file name of the saved artifact inside the output folder (and inside each checkpoint)
    weight_name: str = "adapter.safetensors"
    #: whether the loader drops a last partial batch (large datasets) or keeps it (a handful of instance images)
    drop_last: bool = False

    def __init__(self, config: RunConfig):
        self.config = config

    def check_inputs(self) -> None:
        """Fail fast on bad input before any model is loaded (missing folders, unreadable images)."""
        return None

    @abstractmethod
    def setup(self, run: Run) -> None: ...

    @abstractmethod
    def parameter_groups(self) -> list[dict]: ...

    @abstractmethod
    def trainable_modules(self) -> dict[str, torch.nn.Module]: ...

    @abstractmethod
    def dataset(self, run: Run, prepare) -> torch.utils.data.Dataset:
        """The training set (with ``set_epoch``) and its ``collate`` as ``dataset.collate``; ``prepare(message,
        done, total)`` reports progress of slow preparation (class images)."""

    @abstractmethod
    def loss(self, batch: dict, run: Run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def samples(self, run: Run, kind: str, adapter_path: Path | None = None) -> Samples | None:
        """Validation images of ``kind`` ("baseline", "preview", "final": ``adapter_path`` reloaded); None: none."""
        return None

    def wants_validation(self) -> bool:
        return False

    @abstractmethod
    def save(self, path: Path, extra: dict[str, str] | None = None) -> Path: ...

    @abstractmethod
    def load_checkpoint(self, path: Path) -> None:
        """Restore the trained tensors from a file written by ``save`` (a checkpoint's copy)."""

    def model_card(self, result, samples_file: str | None) -> str | None:
        return None
