"""Controllable synthesis as a training task: a condition encoder plus ETHER adapters on a frozen Stable Diffusion.

The flags follow diffusers' ``train_controlnet.py`` (dataset columns, validation images and prompts, checkpoints,
resume, mixed precision), plus the ETHER knobs and ``--encoder_learning_rate``. The loop is the library's
(``training/trainer.py``), the model an SD 1.x/2.x backend (``training/sd.py``); ``registry.py`` builds the task.
Used by ``scripts/train_control_ether.py``, ``ether-diffusion train-control``, the control demo and the control
benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..training.config import ConfigError, RunConfig, TaskKind, option
from ..training.run import Run
from ..training.task import SampleKind, Samples, Task
from .data import ControlDataset, collate, open_control_image
from .encoder import ConditionEncoder, ConditionEncoderConfig, attach_condition_encoder, set_condition
from .pipeline import CONTROL_WEIGHT_NAME, ENCODER_MODULE, EtherControlPipeline

__all__ = ["PAPER_ENCODER_LEARNING_RATE", "PAPER_LEARNING_RATE", "ControlConfig", "ControlTask"]

PAPER_LEARNING_RATE = 1e-3  # ETHER / ETHER+ on segmentation→image (Bini et al. 2024)
PAPER_ENCODER_LEARNING_RATE = 1e-4  # the encoder's rate is capped at 1e-4 in the paper's setup


@dataclass(kw_only=True)
class ControlConfig(RunConfig):
    task_name = "control"
    kind = TaskKind.CONTROL
    description = "Controllable synthesis: condition encoder + ETHER (flags as diffusers' train_controlnet)"

    train_data_dir: str = option(help="folder with metadata.jsonl (image, conditioning_image, text)")
    image_column: str = option("image", "column of the target images")
    conditioning_image_column: str = option("conditioning_image", "column of the control images")
    caption_column: str = option("text", "column of the captions")
    max_train_samples: int | None = option(None, "use only the first N rows", minimum=1)
    proportion_empty_prompts: float = option(0.0, "share of captions replaced by '' (unprompted control)",
                                             minimum=0.0)  # fmt: skip
    validation_prompt: list[str] | None = option(None, "prompts sampled with the validation images", same_run=False)
    validation_image: list[str] | None = option(None, "control images for validation", same_run=False)
    num_validation_images: int = option(2, "images per (prompt, control) pair", minimum=1, same_run=False)
    validation_guidance_scale: float = option(5.0, "guidance of validation images", minimum=0.0, same_run=False)
    target_modules: tuple[str, ...] = option(
        ("unet-attention-ff",),
        "the paper's control targets (attention + GEGLU input projection); or presets and/or module-path suffixes",
    )
    no_adapters: bool = option(False, "train the condition encoder alone (the paper's baseline)")
    adapter_name: str = option("control", "name stored in the file")
    output_dir: str = option("ether-control", "where checkpoints, validation images and the model go",
                             same_run=False)  # fmt: skip
    train_batch_size: int = option(4, "batch size per process", minimum=1)
    learning_rate: float = option(PAPER_LEARNING_RATE, "learning rate of the adapter vectors", minimum=0.0)
    encoder_learning_rate: float = option(PAPER_ENCODER_LEARNING_RATE, "learning rate of the condition encoder",
                                          minimum=0.0)  # fmt: skip
    tracker_project_name: str = option("ether-control", "TensorBoard project name", same_run=False)

    def validate(self):
        super().validate()
        if self.encoder_learning_rate <= 0:
            raise ConfigError("--encoder_learning_rate must be positive")
        if self.proportion_empty_prompts > 1.0:
            raise ConfigError("--proportion_empty_prompts must lie in [0, 1]")
        prompts, images = self.validation_prompt or [], self.validation_image or []
        if bool(prompts) != bool(images):
            raise ConfigError("--validation_prompt and --validation_image go together: give both or neither")
        if prompts and len(prompts) != len(images) and 1 not in (len(prompts), len(images)):
            raise ConfigError(
                f"{len(prompts)} validation prompts for {len(images)} images: give one of either, or as many of each"
            )
        for path in images:
            if not Path(path).is_file():
                raise ConfigError(f"--validation_image '{path}' does not exist")
        return self

    def validation_pairs(self) -> list[tuple[str, Path]]:
        prompts, images = list(self.validation_prompt or []), list(self.validation_image or [])
        if len(prompts) == 1:
            prompts = prompts * len(images)
        if len(images) == 1:
            images = images * len(prompts)
        return list(zip(prompts, map(Path, images)))


class ControlTask(Task):
    """A condition encoder feeding the UNet, trained with (or without: ``--no_adapters``) ETHER adapters."""

    kind = TaskKind.CONTROL
    weight_name = CONTROL_WEIGHT_NAME
    drop_last = True

    def adapter_configs(self) -> dict:
        return {} if self.config.no_adapters else super().adapter_configs()

    def setup(self, run: Run) -> None:
        super().setup(run)
        self.setup_slot(run)

    def setup_slot(self, run: Run) -> None:
        """The encoder, drawn from the run's seed (as the global generator stands right after the loop seeds it:
        alone or in a pack, the same encoder), attached to the UNet."""
        parts = self.backend.components
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.encoder = ConditionEncoder(ConditionEncoderConfig.for_model(parts.unet, parts.vae_scale_factor))
        self.encoder.to(run.device)
        self.make_current()

    def make_current(self) -> None:
        attach_condition_encoder(self.backend.components.unet, self.encoder)

    def extra_condition(self, batch: dict, run: Run) -> torch.Tensor:
        return run.module("encoder", self.encoder)(batch["conditioning_pixel_values"].to(run.device))

    def set_extra_condition(self, rows: torch.Tensor | None) -> None:
        set_condition(self.backend.components.unet, rows)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"encoder": self.encoder, **super().trainable_modules()}

    def parameter_groups(self) -> list[dict]:
        groups = [{"params": list(self.encoder.parameters()), "lr": self.config.encoder_learning_rate,
                   "name": "encoder"}]  # fmt: skip
        return groups + (super().parameter_groups() if self.params else [])

    def dataset(self, run: Run, prepare) -> ControlDataset:
        config = self.config
        dataset = ControlDataset(
            config.train_data_dir,
            self.backend.components.tokenizer,
            config.resolution,
            config.image_column,
            config.conditioning_image_column,
            config.caption_column,
            config.proportion_empty_prompts,
            config.seed,
            config.max_train_samples,
        )
        dataset.collate = collate
        return dataset

    def loss(self, batch: dict, run: Run):
        self.set_extra_condition(self.extra_condition(batch, run))
        try:
            return self.backend.denoising_loss(batch, run)
        finally:
            self.set_extra_condition(None)

    # --- validation -------------------------------------------------------------------------------------------
    def wants_validation(self) -> bool:
        return bool(self.config.validation_pairs())

    def samples(self, run: Run | None, kind: SampleKind, adapter_path: Path | None = None) -> Samples | None:
        """Per (prompt, control) pair: the control image, then ``num_validation_images`` samples (one grid row)."""
        backend = self.backend
        if kind is SampleKind.FINAL:  # the round trip: the saved file into a fresh pipeline, then samples
            if not self.adapters.loads_into_pipelines:
                return None
            pipe = backend.fresh_pipeline(EtherControlPipeline, run.device)
            pipe.load_control_weights(adapter_path)
            run = None  # fp32, as users load it
        else:
            pipe = backend.pipeline(EtherControlPipeline)
        size = self.config.resolution
        images, prompts = [], []
        for prompt, control_path in self.config.validation_pairs():
            control = open_control_image(control_path, "validation image").convert("RGB")
            if control.size != (size, size):
                control = control.resize((size, size), 0)  # nearest: class colours stay exact
            out = backend.validation_images(pipe, prompt, run, image=control)
            images += [control, *out]
            prompts += [prompt] * (1 + len(out))
        return Samples(images, prompts, columns=1 + self.config.num_validation_images)

    # --- artifacts --------------------------------------------------------------------------------------------
    def save(self, path: Path, extra: dict | None = None) -> Path:
        extra = {
            "task": str(self.kind),
            "encoder_learning_rate": str(self.config.encoder_learning_rate),
            **(extra or {}),
        }
        modules = {ENCODER_MODULE: (self.encoder.config.to_dict(), self.encoder.state_dict())}
        return self.adapters.save(path, self.backend.base_model(), extra, modules)

    def load_checkpoint(self, path: Path) -> None:
        modules = self.adapters.load(path)
        self.encoder.load_state_dict(modules[ENCODER_MODULE])
