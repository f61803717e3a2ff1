"""Stable Diffusion XL as a backend (``sd.py``): DreamBooth on it is diffusers' ``train_dreambooth_lora_sdxl.py``.

SDXL differs from SD 1.x/2.x in the model only, so ``StableDiffusionXLBackend`` overrides the SD backend's hooks, and
``SDXLOptions`` adds the family's flags to a task's configuration (``registry.py`` combines them with DreamBooth's):

- two text encoders: the UNet's text input is their penultimate hidden states side by side (768 + 1280 = 2048 wide
  on SDXL-base), plus the pooled projection of the second (``text_embeds``);
- size and crop conditioning (``time_ids``): each training image's original size, the top-left corner of its crop
  and the target size, as the dataset records them (``training/data.py``);
- ``--train_text_encoder`` adapts both encoders' attention, except the last layer of the first, whose output SDXL
  never reads (it takes the penultimate states): a vector there would get no gradient and hang data parallel;
- ``--pretrained_vae_model_name_or_path``: another VAE (e.g. the fp16-safe one) for training, class images,
  validation and the final reload;
- validation samples with ``StableDiffusionXLPipeline``; the saved file is reloaded into a fresh one.

    config = DreamBoothXLConfig(pretrained_model_name_or_path="stable-diffusion-xl-base-1.0",
                                instance_data_dir="dog/", instance_prompt="a sks dog", max_train_steps=500)
    result = registry.train(config)     # DreamBooth on this backend (any DreamBooth config of an SDXL model does)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..models import ModelLoadError, SDComponents, load_pipeline
from .config import ConfigError, option
from .run import Run
from .sd import StableDiffusionBackend

__all__ = ["SDXLComponents", "SDXLOptions", "StableDiffusionXLBackend", "load_vae"]


@dataclass
class SDXLComponents(SDComponents):
    """SD's components plus the second tokenizer and text encoder (``CLIPTextModelWithProjection``)."""

    tokenizer_2: object = None
    text_encoder_2: object = None
    force_zeros_for_empty_prompt: bool = True  # the model's choice for the unconditional embedding


def load_vae(path: str, revision: str | None = None, variant: str | None = None, torch_dtype=None):
    """An ``AutoencoderKL`` from a VAE folder (its ``config.json``), a model folder (its ``vae/``) or a hub id."""
    from diffusers import AutoencoderKL

    local = Path(path).expanduser()
    subfolder = None
    if local.exists() or path.startswith((".", "/", "~")):
        if (local / "vae" / "config.json").is_file():
            subfolder = "vae"
        elif not (local / "config.json").is_file():
            raise ModelLoadError(
                f"--pretrained_vae_model_name_or_path '{path}' is not a VAE folder (no config.json) nor a model "
                "folder with a vae/ subfolder; pass a folder saved with AutoencoderKL.save_pretrained or a hub id"
            )
    try:
        return AutoencoderKL.from_pretrained(
            path, subfolder=subfolder, revision=revision, variant=variant, torch_dtype=torch_dtype
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load the VAE '{path}': {err}") from err


class StableDiffusionXLBackend(StableDiffusionBackend):
    """The SDXL model for any task; the task's config carries ``SDXLOptions``."""

    family = "sdxl"
    card_tag = "stable-diffusion-xl"
    captures_step = False

    def _vae(self, torch_dtype=None):
        config = self.config
        path = config.pretrained_vae_model_name_or_path
        return None if path is None else load_vae(path, config.revision, config.variant, torch_dtype)

    def load_components(self) -> SDXLComponents:
        from diffusers import DDPMScheduler, StableDiffusionXLPipeline

        config = self.config
        vae = self._vae()
        extra = {} if vae is None else {"vae": vae}
        pipe = load_pipeline(
            config.pretrained_model_name_or_path,
            StableDiffusionXLPipeline,
            config=config.model_config,
            original_config=config.original_config,
            revision=config.revision,
            variant=config.variant,
            **extra,
        )
        return SDXLComponents(
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            vae=pipe.vae,
            unet=pipe.unet,
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            path=str(config.pretrained_model_name_or_path),
            tokenizer_2=pipe.tokenizer_2,
            text_encoder_2=pipe.text_encoder_2,
            force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", True)),
        )

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.components.text_encoder, "text_encoder_2": self.components.text_encoder_2}

    def tokenizers(self) -> list:
        return [self.components.tokenizer, self.components.tokenizer_2]

    def text_encoder_adapter_config(self, component: str, denoiser_config):
        config = super().text_encoder_adapter_config(component, denoiser_config)
        if component == "text_encoder":  # SDXL reads its penultimate layer: the last one never acts
            last = self.components.text_encoder.config.num_hidden_layers - 1
            config = dataclasses.replace(config, exclude_modules=[*config.exclude_modules, f"encoder.layers.{last}"])
        return config

    def encode_text(self, tokens: dict, run: Run) -> dict[str, torch.Tensor]:
        """Both encoders' penultimate hidden states side by side and the second's pooled projection (what
        ``StableDiffusionXLPipeline.encode_prompt`` computes)."""
        states = []
        for i, (component, encoder) in enumerate(self.text_encoders().items()):
            suffix = "" if i == 0 else f"_{i + 1}"
            mask = tokens.get(f"attention_mask{suffix}")
            output = run.module(component, encoder)(
                tokens[f"input_ids{suffix}"].to(run.device),
                attention_mask=None if mask is None else mask.to(run.device),
                output_hidden_states=True,
            )
            states.append(output.hidden_states[-2])  # (B, T, width of this encoder)
        hidden = torch.cat(states, dim=-1)  # (B, T, cross_attention_dim)
        return {"encoder_hidden_states": hidden, "text_embeds": output.text_embeds}  # pooled: (B, projection_dim)

    def condition(self, batch: dict, run: Run) -> dict:
        """The text conditioning, the pooled projection and the size/crop ids (the inputs of
        ``StableDiffusionXLPipeline.encode_prompt`` and ``_get_add_time_ids``)."""
        text = self.text_condition(batch, run)
        hidden = text["encoder_hidden_states"]
        time_ids = batch["add_time_ids"].to(run.device, dtype=hidden.dtype)  # (B, 6)
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"text_embeds": text["text_embeds"],
                                                                       "time_ids": time_ids}}  # fmt: skip

    def pipeline(self, pipeline_class=None, device=None):
        parts = self.components
        pipe = (pipeline_class or self.pipeline_class())(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            text_encoder_2=parts.text_encoder_2,
            tokenizer=parts.tokenizer,
            tokenizer_2=parts.tokenizer_2,
            unet=parts.unet,
            scheduler=self.validation_scheduler(parts.noise_scheduler.config),
            force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def fresh_pipeline(self, pipeline_class=None, device=None, scheduler: str | None = "dpm", **kwargs):
        vae = self._vae(kwargs.get("torch_dtype"))
        if vae is not None:
            kwargs.setdefault("vae", vae)
        return super().fresh_pipeline(pipeline_class, device, scheduler, **kwargs)

    def card_loading_code(self) -> list[str]:
        vae = self.config.pretrained_vae_model_name_or_path
        if vae is None:
            return super().card_loading_code()
        return [
            "from diffusers import AutoencoderKL, StableDiffusionXLPipeline",
            "from ether_diffusion import load_ether_weights",
            "",
            f'vae = AutoencoderKL.from_pretrained("{vae}")  # the VAE it was trained with',
            f'pipe = StableDiffusionXLPipeline.from_pretrained("{self.config.pretrained_model_name_or_path}", vae=vae)',
        ]


@dataclass(kw_only=True)
class SDXLOptions:
    """The flags an SDXL model adds to a task's configuration (diffusers' ``train_dreambooth_lora_sdxl`` names)."""

    family: ClassVar[str] = "sdxl"

    pretrained_vae_model_name_or_path: str | None = option(
        None, "another VAE (folder or hub id), e.g. madebyollin/sdxl-vae-fp16-fix for fp16 training"
    )

    def validate(self):
        super().validate()
        if self.tokenizer_name:
            raise ConfigError(
                "--tokenizer_name replaces the one tokenizer of an SD 1.x/2.x model; an SDXL model uses its own "
                "two tokenizers (drop the flag)"
            )
        return self
