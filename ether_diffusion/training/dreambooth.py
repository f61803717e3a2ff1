"""DreamBooth with ETHER: the subject-driven task (a few images of a subject, an identifier prompt, optional prior
preservation), its configuration with the flags of diffusers' ``train_dreambooth_lora.py``, and its model card.

    config = DreamBoothConfig(instance_data_dir="dog/", instance_prompt="a sks dog", with_prior_preservation=True,
                              class_prompt="a dog", max_train_steps=400, output_dir="out/dog")
    result = train(config)                      # the loop of trainer.py; result.adapter_path is the file

Used by ``scripts/train_dreambooth_ether.py``, ``ether-diffusion train``, the demo, the studio and the benchmarks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..config import METHOD_LABELS
from ..io import DEFAULT_WEIGHT_NAME
from .class_images import ensure_class_images
from .config import ConfigError, RunConfig, option
from .data import DreamBoothDataset, collate, load_image_folder
from .sd import StableDiffusionTask
from .task import Run, Samples
from .trainer import Trainer, TrainResult

__all__ = ["PAPER_LEARNING_RATE", "DreamBoothConfig", "DreamBoothTask", "parse_args", "train"]

PAPER_LEARNING_RATE = 6e-3  # ETHER / ETHER+ DreamBooth (Bini et al. 2024, Tab. 2 setup)


@dataclass(kw_only=True)
class DreamBoothConfig(RunConfig):
    task_name = "dreambooth"
    description = "DreamBooth with ETHER adapters (flags as diffusers' train_dreambooth_lora)"

    instance_data_dir: str = option(help="folder with 3-10 images of the subject")
    instance_prompt: str = option(help="prompt with the identifier, e.g. 'a sks dog'")
    class_data_dir: str | None = option(None, "class images (default <output_dir>/class_images)")
    class_prompt: str | None = option(None, "prompt for the class, e.g. 'a dog'")
    with_prior_preservation: bool = option(False, "also train on class images, to keep the class as it was")
    prior_loss_weight: float = option(1.0, "weight of the class images' loss", minimum=0.0)
    num_class_images: int = option(100, "class images wanted; missing ones are generated", minimum=0)
    sample_batch_size: int = option(4, "batch size for class-image generation", minimum=1, same_run=False)
    prior_generation_precision: str | None = option(
        None, "dtype of class-image generation (default: the training precision)", choices=("no", "fp32", "fp16",
                                                                                              "bf16"),
    )  # fmt: skip
    center_crop: bool = option(False, "crop the centre instead of a random square")
    random_flip: bool = option(False, "flip images horizontally at random")
    train_text_encoder: bool = option(False, "also adapt the text encoder's attention")
    offset_noise: bool = option(False, "add per-channel offset noise (0.1), as diffusers does")
    output_dir: str = option("ether-dreambooth", "where checkpoints, validation images and the adapter go",
                             same_run=False)  # fmt: skip
    learning_rate: float = option(PAPER_LEARNING_RATE, "learning rate of the adapter vectors", minimum=0.0)

    @classmethod
    def for_subject(cls, subject, **fields) -> DreamBoothConfig:
        """A run on a tiny-world subject (``world.subjects.Subject``: its images, instance and class prompts, prior
        preservation on its class) with the shipped model; ``fields`` set or override anything else."""
        from ..models import default_model

        defaults = dict(
            pretrained_model_name_or_path=default_model(),
            instance_data_dir=str(subject.image_paths[0].parent),
            instance_prompt=subject.instance_prompt,
            with_prior_preservation=True,
            class_prompt=subject.class_prompt,
            report_to="none",
        )
        return cls(**{**defaults, **fields})

    def validate(self):
        super().validate()
        if not self.instance_prompt or not self.instance_prompt.strip():
            raise ConfigError("--instance_prompt is empty: name the subject with an identifier, e.g. 'a sks dog'")
        if self.with_prior_preservation and not (self.class_prompt and self.class_prompt.strip()):
            raise ConfigError(
                "--with_prior_preservation needs --class_prompt (e.g. 'a dog'): the prior is the class without the "
                "identifier"
            )
        if self.prior_generation_precision == "fp16":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("--prior_generation_precision fp16 needs a CUDA GPU; use fp32 or bf16 here")
        return self


class DreamBoothTask(StableDiffusionTask):
    name = "dreambooth"
    weight_name = DEFAULT_WEIGHT_NAME

    def __init__(self, config: DreamBoothConfig):
        super().__init__(config)

    def check_inputs(self) -> None:
        self.instance_images = load_image_folder(self.config.instance_data_dir, "instance")

    def adapter_configs(self) -> dict:
        configs = super().adapter_configs()
        if self.config.train_text_encoder:
            configs["text_encoder"] = dataclasses.replace(configs["unet"], target_modules="text-encoder-attention")
        return configs

    # --- data -------------------------------------------------------------------------------------------------
    def dataset(self, run: Run, prepare) -> DreamBoothDataset:
        config = self.config
        class_images = None
        if config.with_prior_preservation:
            class_dir = Path(config.class_data_dir or Path(config.output_dir) / "class_images")
            if run.accelerator.is_main_process:
                self._draw_class_images(class_dir, run, prepare)
            run.accelerator.wait_for_everyone()
            class_images = load_image_folder(class_dir, "class")[: max(config.num_class_images, 1)]
        dataset = DreamBoothDataset(
            self.instance_images,
            config.instance_prompt,
            self.components.tokenizer,
            config.resolution,
            config.center_crop,
            config.random_flip,
            class_images,
            config.class_prompt,
            seed=config.seed,
        )
        dataset.collate = collate
        return dataset

    def _draw_class_images(self, class_dir: Path, run: Run, prepare) -> None:
        """Top the class folder up with images of the base model (the prior is the model before training)."""
        config = self.config
        stack = contextlib.ExitStack()

        def make_pipeline():
            precision = config.prior_generation_precision
            if precision and precision != "no":
                import torch

                from ..models import load_pipeline

                dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
                pipe = load_pipeline(config.pretrained_model_name_or_path, config=config.model_config,
                                     original_config=config.original_config, torch_dtype=dtype)  # fmt: skip
                return pipe.to(run.device)
            stack.enter_context(self.adapters.disabled())
            return self.pipeline()

        with stack:
            ensure_class_images(
                make_pipeline,
                config.class_prompt,
                class_dir,
                config.num_class_images,
                config.sample_batch_size,
                config.seed,
                config.validation_inference_steps,
                config.validation_guidance_scale,
                show_progress=not config.quiet,
                progress=lambda done, total: prepare(f"drawing {total} class images", done, total),
            )

    def loss(self, batch: dict, run: Run):
        config = self.config
        return self.denoising_loss(
            batch, run, 0.1 if config.offset_noise else 0.0, config.with_prior_preservation, config.prior_loss_weight
        )

    # --- validation -------------------------------------------------------------------------------------------
    def wants_validation(self) -> bool:
        return bool(self.config.validation_prompt)

    def samples(self, run: Run, kind: str, adapter_path: Path | None = None) -> Samples | None:
        prompt = self.config.validation_prompt
        if kind == "final":  # the round trip diffusers does: a fresh pipeline from disk, the saved file, samples
            if self.config.peer:
                return None
            from ..pipeline import load_ether_weights

            pipe = self.fresh_pipeline(device=run.device)
            load_ether_weights(pipe, adapter_path)
            images = self.validation_images(pipe, prompt, None)
        else:  # the baseline is the base model: a fresh ETHER reflection is not the identity
            with self.adapters.disabled() if kind == "baseline" else contextlib.nullcontext():
                images = self.validation_images(self.pipeline(), prompt, run)
        return Samples(images, [prompt] * len(images))

    # --- artifacts --------------------------------------------------------------------------------------------
    def save(self, path: Path, extra: dict | None = None) -> Path:
        extra = {"instance_prompt": self.config.instance_prompt, **(extra or {})}
        return self.adapters.save(path, self.base_model(), extra)

    def load_checkpoint(self, path: Path) -> None:
        self.adapters.load(path)

    def model_card(self, result: TrainResult, samples_file: str | None) -> str:
        config = self.config
        configs = {c: cfg.to_dict() for c, cfg in self.adapter_configs().items()}
        method = METHOD_LABELS.get(config.peer or config.ether_method, config.ether_method)
        prior = (
            f"yes, `{config.class_prompt}`, {config.num_class_images} images, weight {config.prior_loss_weight}"
            if config.with_prior_preservation
            else "no"
        )
        lines = [
            "---",
            f"base_model: {config.pretrained_model_name_or_path}",
            "library_name: ether-diffusion",
            "tags: [ether, dreambooth, diffusers, text-to-image]",
            f"instance_prompt: {config.instance_prompt}",
            "---",
            "",
            f"# ETHER DreamBooth adapter: `{config.instance_prompt}`",
            "",
            f"An {method} adapter ({result.trainable_parameters:,} trainable parameters) for "
            f"`{config.pretrained_model_name_or_path}`, trained with ether-diffusion {__version__} for "
            f"{result.global_step} steps in {result.train_seconds:.0f} s.",
            "",
            "```python",
            "from diffusers import StableDiffusionPipeline",
            "from ether_diffusion import load_ether_weights",
            "",
            f'pipe = StableDiffusionPipeline.from_pretrained("{config.pretrained_model_name_or_path}")',
            f'load_ether_weights(pipe, "{config.output_dir}")',
            f'image = pipe("{config.validation_prompt or config.instance_prompt}").images[0]',
            "```",
            "",
            "## Settings",
            "",
            f"- instance prompt: `{config.instance_prompt}`; prior preservation: {prior}",
            f"- learning rate {config.learning_rate} ({config.lr_scheduler}), batch {config.train_batch_size} × "
            f"{config.gradient_accumulation_steps} accumulation × {result.num_processes} processes, resolution "
            f"{config.resolution}, seed {config.seed}",
            f"- snr_gamma {config.snr_gamma}, offset noise {config.offset_noise}, mixed precision "
            f"{result.mixed_precision}",
            f"- adapter config: `{json.dumps(configs)}`",
        ]
        if samples_file:
            lines += ["", f"## Samples: `{config.validation_prompt}`", "", "From the saved file reloaded into a "
                      "fresh pipeline:", "", f"![samples]({samples_file})"]  # fmt: skip
        return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> DreamBoothConfig:
    return DreamBoothConfig.from_args(argv)


def train(config: DreamBoothConfig, callbacks=()) -> TrainResult:
    """Validate ``config`` and run DreamBooth on the library's loop."""
    return Trainer(DreamBoothTask(config.validate()), callbacks).train()
