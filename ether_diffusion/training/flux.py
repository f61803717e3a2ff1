"""Flux as a backend (``sd.py``): DreamBooth on it is diffusers' ``train_dreambooth_lora_flux.py``.

Flux differs from SD 1.x/2.x and SDXL in the model, so ``FluxBackend`` overrides the model hooks (on
``flow.FlowMatchingBackend``: a transformer trained on flow matching) and ``FluxOptions`` sets the family's flags:

- the denoiser is ``FluxTransformer2DModel`` (``pipe.transformer``): 19 double-stream blocks (image and text apart,
  attention joint) and 38 single-stream blocks on Flux-dev. ``--target_modules flux-attention`` (the default) adapts
  the double blocks' image q/k/v/out and text ``add_q_proj``/``add_k_proj``/``add_v_proj``/``to_add_out`` and the single
  blocks' q/k/v; ``flux-attention-ff`` adds the feed-forwards, as diffusers' LoRA default;
- latents are packed 2×2 into tokens (``FluxPipeline._pack_latents``) with their positions (``img_ids``), so images
  must be multiples of 16 pixels; the timestep goes in as σ = t / 1000;
- two text encoders, read as ``FluxPipeline.encode_prompt`` reads them: T5's states (``--max_sequence_length``
  tokens) are the text tokens, CLIP's pooled output the pooled input; ``--train_text_encoder`` adapts CLIP's attention
  (T5 stays frozen, as in diffusers);
- guidance-distilled models (Flux-dev: ``guidance_embeds``) are told ``--guidance_scale`` (3.5) while training, as
  diffusers does; Flux-schnell has no guidance input;
- flow matching with ``--weighting_scheme none`` (uniform σ, weight 1) and the velocity target by default
  (diffusers').

    config = DreamBoothFluxConfig(pretrained_model_name_or_path="FLUX.1-dev", instance_data_dir="dog/",
                                  instance_prompt="a sks dog", resolution=512, max_train_steps=500)
    result = registry.train(config)     # DreamBooth on this backend (any DreamBooth config of a Flux model does)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .config import option
from .flow import FlowMatchingBackend, FlowMatchingOptions
from .run import Run

__all__ = ["FluxBackend", "FluxOptions"]


class FluxBackend(FlowMatchingBackend):
    """The Flux model (dev, schnell) for any task."""

    family = "flux"
    card_tag = "flux"

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.components.modules["text_encoder"]}

    def frozen_encoders(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder_2": self.components.modules["text_encoder_2"]}

    def tokenizers(self) -> list:
        return [self.components.modules["tokenizer"], self.t5_tokenizer("tokenizer_2")]

    def latent_multiple(self) -> int:
        return 2  # 2 x 2 latent patches per token

    def encode_text(self, tokens: dict, run: Run) -> dict[str, torch.Tensor]:
        """T5's states as the text tokens and CLIP's pooled output: what ``FluxPipeline.encode_prompt`` computes."""
        clip = run.module("text_encoder", self.components.modules["text_encoder"])
        pooled = clip(tokens["input_ids"].to(run.device), output_hidden_states=False).pooler_output  # (B, 768)
        with torch.no_grad():  # T5 never trains
            states = self.components.modules["text_encoder_2"](tokens["input_ids_2"].to(run.device))[0]  # (B, L, 4096)
        return {"encoder_hidden_states": states, "pooled_projections": pooled}

    def condition(self, batch: dict, run: Run) -> dict:
        """``encode_text`` of the batch's prompts (or their pre-computed rows), with the text tokens' (zero)
        positions."""
        text = self.text_condition(batch, run)
        states = text["encoder_hidden_states"]
        text_ids = torch.zeros(states.shape[1], 3, device=states.device, dtype=states.dtype)
        return {**text, "txt_ids": text_ids}

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: dict, run: Run) -> torch.Tensor:
        """Pack ``noisy`` (B, C, H, W) into 2×2-patch tokens, run the transformer at σ = t / 1000 (with the guidance
        of a distilled model), unpack its velocity."""
        from diffusers import FluxPipeline

        transformer = self.components.transformer
        batch, channels, height, width = noisy.shape
        tokens = FluxPipeline._pack_latents(noisy, batch, channels, height, width)  # (B, H/2 · W/2, 4C)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.config.guidance_scale, device=noisy.device, dtype=torch.float32)
        velocity = run.module("transformer", transformer)(
            hidden_states=tokens,
            timestep=timesteps / 1000,
            guidance=guidance,
            img_ids=image_ids,
            return_dict=False,
            **condition,
        )[0]
        scale = self.components.vae_scale_factor
        return FluxPipeline._unpack_latents(velocity, height * scale, width * scale, scale)  # (B, C, H, W)


@dataclass(kw_only=True)
class FluxOptions(FlowMatchingOptions):
    """The flags a Flux model adds to a task's configuration, with the defaults of diffusers'
    ``train_dreambooth_lora_flux``."""

    family: ClassVar[str] = "flux"

    target_modules: tuple[str, ...] = option(
        ("flux-attention",),
        "a preset (flux-attention: q/k/v/out of both streams of the double blocks and q/k/v of the "
        "single blocks; flux-attention-ff: also the feed-forwards) and/or module-path suffixes",
    )
    guidance_scale: float = option(
        3.5, "the guidance a distilled model (Flux-dev) is told while training; Flux-schnell has none", minimum=0.0
    )
    validation_guidance_scale: float = option(3.5, "guidance of validation images", minimum=0.0, same_run=False)
