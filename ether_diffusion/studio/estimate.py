"""How long a job will take and how much memory it needs, before Start, measured on the loaded model.

``measure`` runs the job's own configuration for a few real steps in a scratch folder (``CALIBRATION_STEPS``
optimisation steps, one checkpoint, and two samples of the preview batch with 1 and 3 denoising steps), with
the same model, method, blocks, batch and prior preservation (the instance images stand in for class images, so
nothing is drawn). From those timings it scales to the whole job:

    time = setup + class images still missing + (baseline + previews + final check) + steps × step + checkpoints

- a training step: the mean of the timed steps after the first (the first builds the optimizer state);
- a sample of P images with S denoising steps: ``fixed + S × per_step``, fitted from the 1- and 3-step samples;
  class images (batches of 4) are scaled from it linearly per image;
- memory: the model's weights and the trainable state (vector, gradient, two AdamW moments: 16 bytes per trained
  float32 parameter) from parameter sizes, exact; the activations of a training step measured as the peak over
  the steps above what was held before them, less the trainable state: on CUDA the allocator's peak, on Linux CPUs
  the process's peak resident memory (``/proc/self/clear_refs`` resets it), which also counts anything else the
  studio does meanwhile.

What it cannot know: other work on the machine (another client sampling, other programs) slows the job, and the
first steps of a run can be slower or faster than later ones. ``Estimate.markdown`` says all this on the page.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..quantize import stored_bytes
from ..registry import task_for
from ..training.callbacks import Callback
from ..training.data import load_image_folder
from ..training.task import SampleKind
from ..training.trainer import Trainer
from .workspace import StudioError

__all__ = ["CALIBRATION_STEPS", "Estimate", "Measurement", "measure", "project"]

CALIBRATION_STEPS = 4  # the first builds the optimizer state; the other 3 are timed
CLASS_BATCH = 4  # DreamBoothConfig.sample_batch_size


@dataclass
class Measurement:
    """What the calibration run measured."""

    load_seconds: float  # loading the model (the final check loads it again)
    setup_seconds: float  # from the start of a run to its first step: loading, data, accelerate
    step_seconds: float
    checkpoint_seconds: float
    sample_fixed_seconds: float  # per preview batch, whatever the denoising steps
    sample_step_seconds: float  # per denoising step of the preview batch
    preview_batch: int
    weights_bytes: int
    trainable_parameters: int
    activation_bytes: int | None  # None: not measurable here
    memory_method: str
    device: str
    calibration_seconds: float


@dataclass
class Estimate:
    seconds: float
    parts: list[tuple[str, float]]  # (what, seconds)
    memory_bytes: int
    memory_parts: list[tuple[str, int]]  # (what, bytes)
    measured: Measurement
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        m = self.measured
        time_parts = ", ".join(f"{what} {_duration(s)}" for what, s in self.parts if s > 0)
        memory_parts = ", ".join(f"{what} {_mb(b)}" for what, b in self.memory_parts)
        lines = [
            f"**Estimate: about {_duration(self.seconds)}, {_mb(self.memory_bytes)} of {m.device} memory**",
            f"Time: {time_parts}.",
            f"Memory: {memory_parts}.",
            f"Based on {CALIBRATION_STEPS} real training steps of these settings on the loaded model just now "
            f"({m.step_seconds:.3f} s per step, the first not counted) and two preview samples of {m.preview_batch} "
            f"image(s) ({m.sample_fixed_seconds:.2f} s + {m.sample_step_seconds:.3f} s per denoising step), "
            f"measured on {m.device} in {m.calibration_seconds:.0f} s; weights and trainable state from parameter "
            f"sizes, activations {m.memory_method}.",
            "Accuracy: other work on this machine (another page sampling, other programs) slows training; expect "
            "the real time within about ±30% on an otherwise idle machine, more when it is shared.",
            *self.notes,
        ]
        return "\n\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def _mb(count: int) -> str:
    return f"{count / 2**20:,.0f} MB" if count < 10 * 2**30 else f"{count / 2**30:.1f} GB"


# --- memory probes ------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the process's peak resident memory (Linux ≥ 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _Probe(Callback):
    """Times and memory of the calibration run, from the loop's events."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.marks: dict[str, float] = {}
        self.steps: list[float] = []
        self.step_peaks: list[int] = []
        self.checkpoint_seconds = 0.0
        self.rss_based = not self.cuda and _status_kb("VmHWM") is not None and _reset_peak_rss()
        self._base = 0

    def _start_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        elif self.rss_based:
            _reset_peak_rss()
            self._base = _status_kb("VmRSS") * 1024

    def _peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated() - self._base
        return _status_kb("VmHWM") * 1024 - self._base

    def on_prepare(self, preparation) -> None:
        self.marks.setdefault(preparation.message, time.perf_counter())

    def on_train_start(self, total, start_step) -> None:
        self.marks["train"] = time.perf_counter()
        self._start_peak()

    def on_step(self, step, logs) -> None:
        self.steps.append(time.perf_counter())
        if self.cuda or self.rss_based:
            self.step_peaks.append(self._peak())  # since the first step began: what the loop holds at its peak

    def on_checkpoint(self, step, path) -> None:
        self.checkpoint_seconds = time.perf_counter() - self.steps[-1]


def measure(config, scratch: Path | None = None) -> Measurement:
    """Run ``config`` (a job's DreamBooth or control configuration) for ``CALIBRATION_STEPS`` steps in a scratch
    folder and time it; nothing of it is kept."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ether-estimate-", dir=scratch) as folder:
        changes = dict(output_dir=folder, max_train_steps=CALIBRATION_STEPS, checkpointing_steps=CALIBRATION_STEPS,
                       checkpoints_total_limit=None, validation_steps=None, no_final_reload=True, report_to="none",
                       resume_from_checkpoint=None, quiet=True)  # fmt: skip
        if getattr(config, "with_prior_preservation", False):  # the same cost, nothing drawn
            count = len(load_image_folder(config.instance_data_dir, "instance"))
            changes.update(class_data_dir=config.instance_data_dir, num_class_images=count)
        calibration = config.replace(**changes).validate()
        task = task_for(calibration)  # the job's kind on its model's family
        probe = _Probe(cuda=torch.cuda.is_available())
        begun = time.perf_counter()
        result = Trainer(task, [probe]).train()
        if len(probe.steps) < CALIBRATION_STEPS:
            raise StudioError("the calibration run ended early; the settings could not be measured")
        step_seconds = (probe.steps[-1] - probe.steps[0]) / (len(probe.steps) - 1)  # the first step not counted
        load = probe.marks.get("preparing the data", started) - probe.marks.get("loading the base model", started)

        # two samples of the preview batch: 1 and 3 denoising steps -> fixed cost and cost per step
        samples = []
        for steps in (1, 3):
            calibration.validation_inference_steps = steps
            begin = time.perf_counter()
            task.samples(None, SampleKind.PREVIEW)
            samples.append(time.perf_counter() - begin)
        per_step = max((samples[1] - samples[0]) / 2, 1e-6)
        fixed = max(samples[0] - per_step, 0.0)

        backend = task.backend
        models = [backend.denoiser(), *backend.all_text_encoders(), backend.components.vae]
        weights = sum(stored_bytes(p) for m in models for p in m.parameters() if not p.requires_grad)  # quantised too
        trainable = result.trainable_parameters * 16
        # the peak over the steps holds the optimizer state (counted exactly apart) and a step's activations
        activation = max(probe.step_peaks) - trainable if probe.step_peaks else None
        method = (
            "measured as the allocator's peak during a step (CUDA)"
            if probe.cuda
            else "measured as the peak resident memory during a step (approximate: includes anything else the "
            "studio did meanwhile)"
            if probe.rss_based
            else "not measurable on this system"
        )
        return Measurement(
            load_seconds=max(load, 0.0),
            setup_seconds=probe.marks["train"] - begun,
            step_seconds=step_seconds,
            checkpoint_seconds=probe.checkpoint_seconds,
            sample_fixed_seconds=fixed,
            sample_step_seconds=per_step,
            preview_batch=calibration.num_validation_images,
            weights_bytes=weights,
            trainable_parameters=result.trainable_parameters,
            activation_bytes=max(activation, 0) if activation is not None else None,
            memory_method=method,
            device=torch.cuda.get_device_name() if probe.cuda else "CPU",
            calibration_seconds=time.perf_counter() - started,
        )


def project(spec, measured: Measurement, missing_class_images: int = 0) -> Estimate:
    """The whole job of ``spec`` (a validated TrainSpec or ControlSpec) from what ``measure`` found."""
    m = measured
    steps = int(spec.max_train_steps)
    preview = m.sample_fixed_seconds + m.sample_step_seconds * int(spec.preview_steps)
    per_image = preview / max(m.preview_batch, 1)
    previews = 1 + steps // int(spec.preview_every)  # the step-0 baseline, then every N steps
    every = int(getattr(spec, "checkpoint_every", None) or spec.preview_every)
    parts = [
        ("setting up", m.setup_seconds),
        ("class images", missing_class_images * per_image),
        (f"{previews} previews", previews * preview),
        (f"{steps} steps", steps * m.step_seconds),
        ("checkpoints", (steps // every) * m.checkpoint_seconds),
        ("final check", m.load_seconds + preview),
    ]
    trainable = m.trainable_parameters * 16  # float32 vector + gradient + two AdamW moments
    memory = [("weights", m.weights_bytes), ("trainable state", trainable)]
    notes = []
    if m.activation_bytes is not None:
        memory.append(("activations", m.activation_bytes))
    else:
        notes.append("The activations could not be measured here; the memory figure leaves them out.")
    if missing_class_images:
        notes.append(f"{missing_class_images} class images are still to be drawn (scaled from the preview samples).")
    return Estimate(sum(s for _, s in parts), parts, sum(b for _, b in memory), memory, m, notes)
