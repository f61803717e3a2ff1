"""The task interface: what a kind of training (DreamBooth, control, ...) tells the loop.

The loop (``Trainer``) owns everything generic: accelerate, the optimizer and schedule, checkpoints and exact
resume, validation timing, callbacks, the final save and teardown. A task owns the data, the adapters and a model
backend (``sd.py``: SD 1.x/2.x, SDXL, SD3, Flux), which holds everything that depends on the model family:

    setup(run)                      load the frozen model (the backend), add the adapters (the run: device, dtype)
    adapter_configs()               ``{component: EtherConfig}``: what the adapters cover
    parameter_groups()              what trains: [{"params": [...], "lr": ...}, ...]
    trainable_modules()             the modules holding those parameters (wrapped for data parallel by the loop)
    dataset(run, prepare)           the training data (may draw class images first)
    loss(batch, run)                (loss, {name: value}) for one batch
    samples(run, kind)              validation images of a ``SampleKind``: baseline (step 0), preview, final
    save(path, extra)               the artifact users get (an adapter file); also each checkpoint's copy
    load_checkpoint(path)           restore the trained tensors from such a file (exact resume)
    model_card(result)              optional: a README for the output folder

A task is built from its run configuration (``RunConfig`` subclass) and a backend, by ``registry.task_for`` (which
picks the backend by the model's family), and trained with ``Trainer(task, callbacks).train()``. Its adapters are
ETHER's unless the caller passes others (the benchmarks' PEFT peers, ``adapters.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import ClassVar

import torch

from .adapters import EtherAdapters
from .config import RunConfig, TaskKind
from .run import Run
from .sd import StableDiffusionBackend

__all__ = ["Run", "SampleKind", "Samples", "Task"]


class SampleKind(str, Enum):
    """What validation images show."""

    BASELINE = "baseline"  # step 0: the base model, what training is judged against
    PREVIEW = "preview"  # the adapter as trained so far
    FINAL = "final"  # the saved file reloaded into a fresh pipeline

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__  # equal to its value, and found by it in dicts and sets


@dataclass
class Samples:
    """Images to show; ``columns`` makes the loop write one grid (rows of ``columns``) instead of one file each."""

    images: list
    prompts: list[str] = field(default_factory=list)
    columns: int | None = None


class Task(ABC):
    #: the kind of training (its configuration class says the same)
    kind: ClassVar[TaskKind]
    #: file name of the saved artifact inside the output folder (and inside each checkpoint)
    weight_name: ClassVar[str] = "adapter.safetensors"
    #: whether the loader drops a last partial batch (large datasets) or keeps it (a handful of instance images)
    drop_last: ClassVar[bool] = False

    def __init__(self, config: RunConfig, backend: StableDiffusionBackend, adapters=None):
        self.config = config
        self.backend = backend
        self.adapters = adapters if adapters is not None else EtherAdapters(config.adapter_name, backend.family)

    @property
    def name(self) -> str:
        """Recorded in checkpoints and adapter files: the kind, and the family where it is not SD 1.x/2.x
        (``dreambooth``, ``dreambooth-sdxl``, ``control``)."""
        family = self.backend.family
        return str(self.kind) if family == "sd" else f"{self.kind}-{family}"

    def check_inputs(self) -> None:
        """Fail fast on bad input before any model is loaded (missing folders, unreadable images)."""
        return None

    def capture_refusal(self) -> str | None:
        """Why ``--cuda_graphs`` cannot capture this task's step, or None when it can (``graphs.py``)."""
        return f"{self.kind} training does not capture its step (only DreamBooth on SD 1.x/2.x does)"

    # --- the model and what trains ------------------------------------------------------------------------------
    def setup(self, run: Run) -> None:
        """Load the frozen model and add the adapters of ``adapter_configs`` to it."""
        self.backend.load(run, f"{self.kind} training ({type(self).__name__})")
        self.backend.attach(self.adapters, self.adapter_configs(), run)
        self.params = self.adapters.parameters()

    # a packed run (``pack.py``) shares one loaded model among its slots' tasks; a task with modules of its own
    # besides the adapters (control: its condition encoder) builds them here and feeds them to the shared model
    def setup_slot(self, run: Run) -> None:
        """Build this run's own modules besides the adapters (drawn as its solo run draws them), on the shared
        model; the default has none."""
        return None

    def make_current(self) -> None:
        """Put this run's own modules in the shared model before it samples (previews); the default has none."""
        return None

    def extra_condition(self, batch: dict, run: Run) -> torch.Tensor | None:
        """What this run's own modules add to the denoiser for ``batch`` (one row per sample), or None."""
        return None

    def set_extra_condition(self, rows: torch.Tensor | None) -> None:
        """Give the shared denoiser the rows of ``extra_condition`` for its next call (None: clear them)."""
        return None

    def adapter_configs(self) -> dict:
        """``{component: EtherConfig}`` of what to adapt: the denoiser, with the flags' targets."""
        return {self.backend.denoiser_component: self.backend.denoiser_adapter_config()}

    def parameter_groups(self) -> list[dict]:
        return [{"params": self.params, "lr": self.config.learning_rate, "name": "adapter"}]

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return dict(self.adapters.models)

    # --- the data and the loss ----------------------------------------------------------------------------------
    @abstractmethod
    def dataset(self, run: Run, prepare) -> torch.utils.data.Dataset:
        """The training set (with ``set_epoch``) and its ``collate`` as ``dataset.collate``; ``prepare(message,
        done, total)`` reports progress of slow preparation (class images)."""

    @abstractmethod
    def loss(self, batch: dict, run: Run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    # --- validation and artifacts -------------------------------------------------------------------------------
    def samples(self, run: Run | None, kind: SampleKind, adapter_path: Path | None = None) -> Samples | None:
        """Validation images of ``kind`` (``FINAL``: ``adapter_path`` reloaded); None: none."""
        return None

    def wants_validation(self) -> bool:
        return False

    @abstractmethod
    def save(self, path: Path, extra: dict[str, str] | None = None) -> Path: ...

    def after_save(self, adapter_path: Path, run: Run) -> list[Path]:
        """Files made from the saved artifact at the end of a run (DreamBooth: ``--output_kohya_format``'s LoRA)."""
        return []

    def load_checkpoint(self, path: Path) -> None:
        """Restore the trained tensors from a file written by ``save`` (a checkpoint's copy)."""
        self.adapters.load(path)

    def model_card(self, result, samples_file: str | None) -> str | None:
        return None
