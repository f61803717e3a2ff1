"""The benchmarks' base pipeline, and a trained run's adapter file loaded into a copy of its modules for sampling.

Every run is sampled from its saved file (the round trip users make), not from the trainer's modules in memory: the
same code then serves a run trained a minute ago and one trained before an interruption. ETHER files and the PEFT
peers' files load through the task's own adapter interface (``training.adapters``), into deep copies of the base
pipeline's UNet (and text encoder when it was adapted), so the base pipeline itself never changes.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import torch

from ..files import atomic_write
from ..images import open_image
from ..models import load_pipeline

__all__ = ["BasePipeline", "adapted_modules", "image_files", "save_image", "swapped"]


class BasePipeline:
    """The base model, loaded once on first use, with the benchmark's sampler, on the training device and dtype."""

    def __init__(self, config, pipeline_class=None):
        self.config, self.pipeline_class, self._pipe = config, pipeline_class, None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def dtype(self) -> torch.dtype:
        precision = self.config.mixed_precision
        if precision == "fp16" and self.device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if precision == "bf16" else torch.float32

    @property
    def pipe(self):
        if self._pipe is None:
            from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

            config = self.config
            kwargs = {"torch_dtype": self.dtype} if self.dtype != torch.float32 else {}
            for key in ("revision", "variant"):
                if getattr(config, key, None):
                    kwargs[key] = getattr(config, key)
            pipe = load_pipeline(config.pretrained_model_name_or_path, self.pipeline_class, config=config.model_config,
                                 original_config=config.original_config, **kwargs)  # fmt: skip
            schedulers = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
            if config.scheduler in schedulers:
                pipe.scheduler = schedulers[config.scheduler].from_config(pipe.scheduler.config)
            self._pipe = pipe.to(self.device)
        return self._pipe


def adapted_modules(pipe, task, adapter_path: Path) -> tuple[dict[str, torch.nn.Module], int, dict]:
    """Copies of the pipeline's modules that ``task`` adapts, with the adapter file at ``adapter_path`` loaded:
    ``(modules by component, trainable adapter parameters, extra modules' states)`` (the control encoder's).
    ``task`` is a new task of the run (``registry.task_for``), not set up: its adapters go onto the copies."""
    configs = task.adapter_configs()
    available = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    models = {component: copy.deepcopy(available[component]).requires_grad_(False) for component in configs}
    adapters = task.adapters
    adapters.add(models, configs)
    parameters = sum(p.numel() for p in adapters.parameters())  # only what the adapters added requires grad
    extra = adapters.load(adapter_path)
    for model in models.values():
        model.requires_grad_(False).eval()
    return models, parameters, extra


@contextlib.contextmanager
def swapped(pipe, modules: dict[str, torch.nn.Module]):
    """``pipe`` with ``modules`` (by component name) in place of its own, restored afterwards."""
    original = {name: getattr(pipe, name) for name in modules}
    for name, module in modules.items():
        setattr(pipe, name, module)
    try:
        yield pipe
    finally:
        for name, module in original.items():
            setattr(pipe, name, module)


def save_image(image, path: Path) -> Path:
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def image_files(paths: list[Path]) -> list:
    return [open_image(p, "sample") for p in paths]
