"""DreamBooth with ETHER: the subject-driven task (a few images of a subject, an identifier prompt, optional prior
preservation), its configuration with the flags of diffusers' ``train_dreambooth_lora.py``, and its model card.

    config = DreamBoothConfig(instance_data_dir="dog/", instance_prompt="a sks dog", with_prior_preservation=True,
                              class_prompt="a dog", max_train_steps=400, output_dir="out/dog")
    result = registry.train(config)             # the loop of trainer.py; result.adapter_path is the file

The task runs on any model backend (SD 1.x/2.x, SDXL, SD3, Flux: ``sd.py`` and its siblings). ``registry.py`` picks
the backend and the configuration class by the model's family (an SDXL model adds ``--pretrained_vae_model_name_or_
path``, SD3 and Flux the flow-matching flags): used by ``ether-diffusion train``, the script, the demo, the studio and
the benchmarks.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from .._version import __version__
from ..config import DTYPES
from ..export import export_adapters
from ..io import DEFAULT_WEIGHT_NAME
from ..models import default_model
from ..pipeline import load_ether_weights
from .class_images import ensure_class_images
from .config import FOREIGN_FLAGS, ConfigError, ForeignFlag, RunConfig, TaskKind, option
from .data import (
    INTERPOLATION_MODES,
    DreamBoothDataset,
    augmentations,
    collate,
    load_captioned_folder,
    load_dataset_images,
    load_image_folder,
)
from .run import Run
from .task import SampleKind, Samples, Task
from .text import check_prompt
from .trainer import TrainResult

__all__ = ["DREAMBOOTH_FOREIGN_FLAGS", "PAPER_LEARNING_RATE", "DreamBoothConfig", "DreamBoothTask"]

#: ``--output_kohya_format``'s file in the output folder: the name diffusers' train_dreambooth_lora_sdxl.py gives it
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
PAPER_LEARNING_RATE = 6e-3  # ETHER / ETHER+ DreamBooth (Bini et al. 2024, Tab. 2 setup)


#: flags of diffusers' DreamBooth scripts DreamBooth answers without a field (besides every task's)
DREAMBOOTH_FOREIGN_FLAGS = {
    **FOREIGN_FLAGS,
    "class_labels_conditioning": ForeignFlag(
        "it feeds the timestep as a class label to UNets that have a class embedding (DeepFloyd IF's upscaler); the "
        "SD 1.x/2.x and SDXL UNets trained here have none. Drop the flag",
        takes_value=True,
    ),
    "validation_images": ForeignFlag(
        "they are input images of image-conditioned pipelines (DeepFloyd IF's upscaler, image variation); DreamBooth "
        "here is text-to-image and validates from --validation_prompt. Drop the flag (for control maps: "
        "`ether-diffusion train-control --validation_image`)",
        takes_value=True,
    ),
    "use_dora": ForeignFlag(
        "DoRA splits a LoRA update into a magnitude and a direction per weight column; an ETHER transform already "
        "keeps every weight's norm (a reflection is orthogonal) and ETHER+ relaxes that by design. For more capacity "
        "use --ether_method ether_plus, more --n_blocks or more --target_modules",
    ),
    "do_edm_style_training": ForeignFlag(
        "EDM-style preconditioning and timestep sampling (for Playground v2.5) are not implemented here; training "
        "uses the model's own epsilon or v objective. Drop the flag",
    ),
    "skip_save_text_encoder": ForeignFlag(
        "the output never holds a text encoder's weights, only the adapter's vectors (with --train_text_encoder, the "
        "text encoder's ETHER vectors are in the adapter file)",
        accepted=True,
    ),
}


@dataclass(kw_only=True)
class DreamBoothConfig(RunConfig):
    task_name = "dreambooth"
    kind = TaskKind.DREAMBOOTH
    description = (
        "DreamBooth with ETHER adapters (flags as diffusers' train_dreambooth_lora and train_dreambooth). An SDXL, "
        "SD3 or Flux model (--pretrained_model_name_or_path) is detected and adds its flags: see --help with that model"
    )
    foreign_flags = DREAMBOOTH_FOREIGN_FLAGS

    target_modules: tuple[str, ...] = option(
        ("unet-attention-image",),
        "presets and/or module-path suffixes. Default unet-attention-image: every attention projection "
        "that reads image tokens (the paper's targets less cross-attention's keys and values, which transform every "
        "prompt's text tokens and carried most of the prompt drift measured in docs/quality.md); unet-attention is "
        "the paper's",
    )
    instance_data_dir: str | None = option(
        None, "folder with 3-10 images of the subject; a caption file beside an image (dog1.png, dog1.txt: kohya's "
        "layout) replaces --instance_prompt for that image",
    )  # fmt: skip
    instance_prompt: str = option(help="prompt with the identifier, e.g. 'a sks dog'; the caption of every image "
                                  "without one")  # fmt: skip
    caption_extension: str = option(".txt", "extension of the caption files beside the instance images")
    dataset_name: str | None = option(
        None, "instead of --instance_data_dir: a `datasets` folder (save_to_disk), an image folder with "
        "metadata.jsonl, or a Hub dataset id (needs the datasets package)",
    )  # fmt: skip
    dataset_config_name: str | None = option(None, "the dataset's configuration, if it has several")
    cache_dir: str | None = option(None, "where the datasets package caches what it loads", same_run=False)
    image_column: str = option("image", "the dataset's image column")
    caption_column: str | None = option(
        None, "the dataset's caption column (default: --instance_prompt for every image; an empty caption also "
        "gets it)",
    )  # fmt: skip
    repeats: int = option(1, "times each instance image appears in an epoch", minimum=1)
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
    image_interpolation_mode: str = option(
        "bicubic", "resampling filter of the resize to --resolution", choices=INTERPOLATION_MODES
    )
    cache_latents: bool = option(
        False, "encode each image once: the VAE's latent distribution is kept per image and augmentation (crop, "
        "flip), so training sees exactly what it would without the cache",
    )  # fmt: skip
    output_kohya_format: bool = option(
        False, "also write the adapter as an exact kohya LoRA, pytorch_lora_weights_kohya.safetensors, for ComfyUI, "
        "A1111 and Forge (as diffusers' SDXL script does; not for SD3, which has no kohya format)", same_run=False,
    )  # fmt: skip
    train_text_encoder: bool = option(False, "also adapt the text encoder's attention (SDXL: both encoders)")
    text_encoder_lr: float | None = option(
        None, "learning rate of the text encoders' vectors (default: --learning_rate)", minimum=0.0
    )
    adam_weight_decay_text_encoder: float | None = option(
        None, "weight decay of the text encoders' vectors (default: --adam_weight_decay)", minimum=0.0
    )
    pre_compute_text_embeddings: bool = option(
        False, "encode every prompt once before training and keep the text encoders off the accelerator while "
        "training (not with --train_text_encoder)",
    )  # fmt: skip
    tokenizer_max_length: int | None = option(
        None, "tokens per prompt (default: the tokenizer's own, 77 for CLIP)", minimum=1
    )
    text_encoder_use_attention_mask: bool = option(False, "pass the padding mask to the text encoders")
    offset_noise: bool = option(False, "add per-channel offset noise (0.1), as diffusers does")
    output_dir: str = option("ether-dreambooth", "where checkpoints, validation images and the adapter go",
                             same_run=False)  # fmt: skip
    learning_rate: float = option(PAPER_LEARNING_RATE, "learning rate of the adapter vectors", minimum=0.0)

    @classmethod
    def for_subject(cls, subject, **fields) -> DreamBoothConfig:
        """A run on a tiny-world subject (``world.subjects.Subject``: its images, instance and class prompts, prior
        preservation on its class) with the shipped model; ``fields`` set or override anything else."""
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
        if self.output_kohya_format and self.family == "sd3":
            raise ConfigError(
                "--output_kohya_format: SD3 has no kohya LoRA format (diffusers reads SD3 LoRAs in its own only); "
                "drop the flag and export with `ether-diffusion export ADAPTER --format diffusers`"
            )
        if not self.instance_prompt or not self.instance_prompt.strip():
            raise ConfigError("--instance_prompt is empty: name the subject with an identifier, e.g. 'a sks dog'")
        for flag, prompt in (("--instance_prompt", self.instance_prompt), ("--class_prompt", self.class_prompt)):
            try:
                check_prompt(prompt or "", flag)  # the limit of captions (text.MAX_PROMPT_CHARS)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if bool(self.instance_data_dir) == bool(self.dataset_name):
            raise ConfigError(
                "give the subject's images as one of --instance_data_dir (a folder of images) or --dataset_name (a "
                "datasets folder or an image folder with metadata.jsonl)"
                + (", not both" if self.instance_data_dir else "")
            )
        if self.caption_column and not self.dataset_name:
            raise ConfigError(
                "--caption_column names a column of --dataset_name; in --instance_data_dir put a caption file "
                f"beside each image instead (dog1.png, dog1{self.caption_extension})"
            )
        if not self.caption_extension.startswith(".") or len(self.caption_extension) < 2:
            raise ConfigError(f"--caption_extension must look like .txt, not {self.caption_extension!r}")
        if self.pre_compute_text_embeddings and self.train_text_encoder:
            raise ConfigError(
                "--pre_compute_text_embeddings encodes the prompts once with the frozen text encoder; with "
                "--train_text_encoder the encoder changes every step: use one of them"
            )
        if (self.text_encoder_lr is not None or self.adam_weight_decay_text_encoder is not None) and not (
            self.train_text_encoder
        ):
            raise ConfigError("--text_encoder_lr/--adam_weight_decay_text_encoder need --train_text_encoder")
        if self.text_encoder_lr is not None and self.text_encoder_lr <= 0:
            raise ConfigError("--text_encoder_lr must be positive")
        if self.optimizer == "prodigy" and self.text_encoder_lr not in (None, self.learning_rate):
            raise ConfigError(
                "Prodigy takes one learning rate for every parameter group (it scales its own step-size estimate): "
                "drop --text_encoder_lr, or give it --learning_rate's value"
            )
        if self.dataset_name:
            try:
                import datasets  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "--dataset_name needs the datasets package (pip install datasets, or pip install "
                    "'ether-diffusion[datasets]'); or put the images in a folder for --instance_data_dir, with a "
                    f"caption file beside each (dog1.png, dog1{self.caption_extension})"
                ) from None
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


class DreamBoothTask(Task):
    """DreamBooth on any backend: the subject's images and prompts, class images and prior preservation,
    validation samples, and the adapter file with its model card."""

    kind = TaskKind.DREAMBOOTH
    weight_name = DEFAULT_WEIGHT_NAME
    card_tags = ("ether", "dreambooth", "diffusers", "text-to-image")

    def check_inputs(self) -> None:
        config = self.config
        if config.dataset_name:
            self.instance_images, self.instance_prompts = load_dataset_images(
                config.dataset_name, config.instance_prompt, config.image_column, config.caption_column,
                config.dataset_config_name, config.cache_dir,
            )  # fmt: skip
        else:
            self.instance_images, self.instance_prompts = load_captioned_folder(
                config.instance_data_dir, config.instance_prompt, config.caption_extension
            )

    def after_save(self, adapter_path: Path, run: Run) -> list[Path]:
        """``--output_kohya_format``: the saved adapter exported as an exact kohya LoRA beside it (fp32)."""
        if not self.config.output_kohya_format:
            return []
        output = adapter_path.parent / KOHYA_FILE
        summary = export_adapters([adapter_path], output, self.backend.fresh_pipeline(scheduler=None), format="kohya")
        return [summary.path]

    def capture_refusal(self) -> str | None:
        if not self.backend.captures_step:
            return f"the {self.backend.family} model's step is not captured (only SD 1.x/2.x's is)"
        if self.config.cache_latents:
            return "--cache_latents looks each batch's latents up on the host, which a replay would skip"
        return None

    def adapter_configs(self) -> dict:
        configs = super().adapter_configs()
        backend = self.backend
        if self.config.train_text_encoder:
            for component in backend.text_encoders():
                denoiser = configs[backend.denoiser_component]
                configs[component] = backend.text_encoder_adapter_config(component, denoiser)
        return configs

    def parameter_groups(self) -> list[dict]:
        """One group; with --text_encoder_lr or --adam_weight_decay_text_encoder, the text encoders' vectors in a
        group of their own (first, so the logged ``lr`` stays the UNet's)."""
        config = self.config
        if config.text_encoder_lr is None and config.adam_weight_decay_text_encoder is None:
            return super().parameter_groups()
        encoders = [c for c in self.backend.text_encoders() if c in self.adapters.models]
        encoder_group = {
            "params": self.adapters.parameters(encoders),
            "name": "text_encoder",
            "lr": config.text_encoder_lr if config.text_encoder_lr is not None else config.learning_rate,
        }
        if config.adam_weight_decay_text_encoder is not None:
            encoder_group["weight_decay"] = config.adam_weight_decay_text_encoder
        denoiser = [self.backend.denoiser_component]
        denoiser_group = {"params": self.adapters.parameters(denoiser), "lr": config.learning_rate, "name": "adapter"}
        return [encoder_group, denoiser_group]

    # --- data -------------------------------------------------------------------------------------------------
    def dataset(self, run: Run, prepare) -> DreamBoothDataset:
        config = self.config
        class_images = None
        if config.with_prior_preservation:
            class_dir = Path(config.class_data_dir or Path(config.output_dir) / "class_images")
            if run.accelerator.is_main_process:
                self._draw_class_images(class_dir, run, prepare)
            run.accelerator.wait_for_everyone()
            class_images = load_image_folder(class_dir, "class", limit=max(config.num_class_images, 1))
        backend = self.backend
        dataset = DreamBoothDataset(
            self.instance_images,
            self.instance_prompts,
            backend.tokenizers(),
            config.resolution,
            config.center_crop,
            config.random_flip,
            class_images,
            config.class_prompt,
            seed=config.seed,
            repeats=config.repeats,
            interpolation=config.image_interpolation_mode,
            max_length=config.tokenizer_max_length,
            attention_mask=config.text_encoder_use_attention_mask,
        )
        dataset.collate = collate
        if config.cache_latents:
            backend.enable_latent_cache()
            variants = max(augmentations(i, config.resolution, config.center_crop, config.random_flip)
                           for i in [*self.instance_images, *(class_images or [])])  # fmt: skip
            if variants > 8 and not config.quiet and run.accelerator.is_main_process:
                print(
                    f"--cache_latents: random crops give an image up to {variants} different inputs, which rarely "
                    "repeat, so the cache saves little; --center_crop or square images make every epoch after the "
                    "first free of VAE work"
                )
        if config.pre_compute_text_embeddings:
            prepare(f"encoding {len(dataset.prompts)} prompts")
            backend.precompute_text(dataset.tokens, run)
        return dataset

    def _draw_class_images(self, class_dir: Path, run: Run, prepare) -> None:
        """Top the class folder up with images of the base model (the prior is the model before training)."""
        config = self.config
        stack = contextlib.ExitStack()

        def make_pipeline():
            precision = config.prior_generation_precision
            if precision and precision != "no":
                dtype = DTYPES[precision]
                return self.backend.fresh_pipeline(device=run.device, scheduler=None, torch_dtype=dtype)
            stack.enter_context(self.adapters.disabled())
            return self.backend.pipeline()

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
        return self.backend.denoising_loss(
            batch, run, 0.1 if config.offset_noise else 0.0, config.with_prior_preservation, config.prior_loss_weight
        )

    # --- validation -------------------------------------------------------------------------------------------
    def wants_validation(self) -> bool:
        return bool(self.config.validation_prompt)

    def samples(self, run: Run | None, kind: SampleKind, adapter_path: Path | None = None) -> Samples | None:
        prompt, backend = self.config.validation_prompt, self.backend
        if kind is SampleKind.FINAL:  # the round trip diffusers does: a fresh pipeline from disk, the file, samples
            if not self.adapters.loads_into_pipelines:
                return None
            pipe = backend.fresh_pipeline(device=run.device)
            load_ether_weights(pipe, adapter_path)
            images = backend.validation_images(pipe, prompt, None)
        else:  # the baseline is the base model: a fresh ETHER reflection is not the identity
            base = self.adapters.disabled() if kind is SampleKind.BASELINE else contextlib.nullcontext()
            with base, backend.text_encoders_ready():
                images = backend.validation_images(backend.pipeline(), prompt, run)
        return Samples(images, [prompt] * len(images))

    # --- artifacts --------------------------------------------------------------------------------------------
    def save(self, path: Path, extra: dict | None = None) -> Path:
        extra = {"instance_prompt": self.config.instance_prompt, **(extra or {})}
        return self.adapters.save(path, self.backend.base_model(), extra)

    def model_card(self, result: TrainResult, samples_file: str | None) -> str:
        config = self.config
        configs = {c: cfg.to_dict() for c, cfg in self.adapter_configs().items()}
        method = self.adapters.label
        tags = [*self.card_tags, *([self.backend.card_tag] if self.backend.card_tag else [])]
        prior = (
            f"yes, `{config.class_prompt}`, {config.num_class_images} images, weight {config.prior_loss_weight}"
            if config.with_prior_preservation
            else "no"
        )
        captioned = sum(p != config.instance_prompt for p in self.instance_prompts)
        data = config.dataset_name or config.instance_data_dir
        captions = f"{captioned} of {len(self.instance_prompts)} images with their own caption" if captioned else ""
        lines = [
            "---",
            f"base_model: {config.pretrained_model_name_or_path}",
            "library_name: ether-diffusion",
            f"tags: [{', '.join(tags)}]",
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
            *self.backend.card_loading_code(),
            f'load_ether_weights(pipe, "{config.output_dir}")',
            f'image = pipe("{config.validation_prompt or config.instance_prompt}").images[0]',
            "```",
            "",
            "## Settings",
            "",
            f"- data: `{data}`{', ' + captions if captions else ''}, repeats {config.repeats}; instance prompt: "
            f"`{config.instance_prompt}`; prior preservation: {prior}",
            f"- optimizer {config.optimizer}, cached latents {config.cache_latents}, pre-computed text embeddings "
            f"{config.pre_compute_text_embeddings}",
            f"- learning rate {config.learning_rate} ({config.lr_scheduler}), batch {config.train_batch_size} × "
            f"{config.gradient_accumulation_steps} accumulation × {result.num_processes} processes, resolution "
            f"{config.resolution}, seed {config.seed}",
            f"- snr_gamma {config.snr_gamma}, offset noise {config.offset_noise}, mixed precision "
            f"{result.mixed_precision}, torch.compile {result.compiled or 'no'}",
            f"- adapter config: `{json.dumps(configs)}`",
        ]
        if samples_file:
            lines += ["", f"## Samples: `{config.validation_prompt}`", "", "From the saved file reloaded into a "
                      "fresh pipeline:", "", f"![samples]({samples_file})"]  # fmt: skip
        return "\n".join(lines) + "\n"
