"""Stable Diffusion 3 as a backend (``sd.py``): DreamBooth on it is diffusers' ``train_dreambooth_lora_sd3.py``.

SD3 differs from SD 1.x/2.x and SDXL in the model, so ``StableDiffusion3Backend`` overrides the model hooks (on
``flow.FlowMatchingBackend``: a transformer trained on flow matching) and ``SD3Options`` sets the family's flags:

- the denoiser is an MMDiT (``SD3Transformer2DModel``, ``pipe.transformer``); ``--target_modules sd3-attention`` (the
  default) adapts every joint block's image-stream q/k/v/out and text-stream ``add_q_proj``/``add_k_proj``/
  ``add_v_proj``/``to_add_out``;
- three text encoders, read as ``StableDiffusion3Pipeline.encode_prompt`` reads them: the two CLIP encoders'
  penultimate hidden states side by side, zero-padded to T5's width, followed along the sequence by T5's states
  (``--max_sequence_length`` tokens); the pooled input is the two CLIP projections side by side. A model saved without
  T5 (``text_encoder_3=None``) gets zeros in its place, as the pipeline does;
- ``--train_text_encoder`` adapts the attention of both CLIP encoders; T5 stays frozen (as in diffusers);
- the last joint block is ``context_pre_only``: the text tokens' queries there (``add_q_proj``) only make text
  outputs that nothing reads, so vectors on it would never get a gradient (and would hang data parallel): training
  leaves it out;
- flow matching with ``--weighting_scheme logit_normal`` and ``--precondition_outputs 1`` by default (diffusers').

    config = DreamBoothSD3Config(pretrained_model_name_or_path="stable-diffusion-3-medium-diffusers",
                                 instance_data_dir="dog/", instance_prompt="a sks dog", max_train_steps=500)
    result = registry.train(config)     # DreamBooth on this backend (any DreamBooth config of an SD3 model does)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .config import option
from .flow import WEIGHTING_SCHEMES, FlowMatchingBackend, FlowMatchingOptions
from .run import Run

__all__ = ["SD3Options", "StableDiffusion3Backend"]


class StableDiffusion3Backend(FlowMatchingBackend):
    """The SD3 model (SD3-medium, SD3.5) for any task."""

    family = "sd3"
    card_tag = "sd3"

    def text_encoders(self) -> dict[str, torch.nn.Module]:
        modules = self.components.modules
        return {"text_encoder": modules["text_encoder"], "text_encoder_2": modules["text_encoder_2"]}

    def frozen_encoders(self) -> dict[str, torch.nn.Module]:
        t5 = self.components.modules.get("text_encoder_3")
        return {} if t5 is None else {"text_encoder_3": t5}

    def tokenizers(self) -> list:
        modules = self.components.modules
        t5 = [self.t5_tokenizer("tokenizer_3")] if modules.get("text_encoder_3") is not None else []
        return [modules["tokenizer"], modules["tokenizer_2"], *t5]

    def latent_multiple(self) -> int:
        return self.components.transformer.config.patch_size

    def denoiser_adapter_config(self):
        config = super().denoiser_adapter_config()
        # the text queries of context_pre_only blocks make outputs nothing reads
        blocks = self.components.transformer.transformer_blocks
        unread = [f"transformer_blocks.{i}.attn.add_q_proj" for i, b in enumerate(blocks) if b.context_pre_only]
        return dataclasses.replace(config, exclude_modules=[*config.exclude_modules, *unread])

    def encode_text(self, tokens: dict, run: Run) -> dict[str, torch.Tensor]:
        """The transformer's text input (the two CLIPs' penultimate states, padded, then T5's) and pooled input (the
        CLIP projections): what ``StableDiffusion3Pipeline.encode_prompt`` computes."""
        states, pooled = [], []
        for key, (component, encoder) in zip(("input_ids", "input_ids_2"), self.text_encoders().items()):
            output = run.module(component, encoder)(tokens[key].to(run.device), output_hidden_states=True)
            states.append(output.hidden_states[-2])  # (B, 77, width of this encoder)
            pooled.append(output.text_embeds)  # (B, projection_dim)
        clip = torch.cat(states, dim=-1)  # (B, 77, 768 + 1280 on SD3)
        transformer = self.components.transformer
        if "input_ids_3" in tokens:
            with torch.no_grad():  # T5 never trains
                t5 = self.components.modules["text_encoder_3"](tokens["input_ids_3"].to(run.device))[0]
        else:  # no T5 in this model: zeros, as the pipeline uses
            shape = (clip.shape[0], self.config.max_sequence_length, transformer.config.joint_attention_dim)
            t5 = torch.zeros(shape, device=clip.device, dtype=clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, 77, T5 width)
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    def condition(self, batch: dict, run: Run) -> dict:
        """``encode_text`` of the batch's prompts (or their pre-computed rows)."""
        return self.text_condition(batch, run)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: dict, run: Run) -> torch.Tensor:
        transformer = run.module("transformer", self.components.transformer)
        return transformer(hidden_states=noisy, timestep=timesteps, return_dict=False, **condition)[0]


@dataclass(kw_only=True)
class SD3Options(FlowMatchingOptions):
    """The flags an SD3 model adds to a task's configuration, with the defaults of diffusers'
    ``train_dreambooth_lora_sd3``."""

    family: ClassVar[str] = "sd3"

    target_modules: tuple[str, ...] = option(
        ("sd3-attention",),
        "a preset (sd3-attention: image and text q/k/v/out of every joint block) and/or module-path suffixes",
    )
    weighting_scheme: str = option(
        "logit_normal",
        "how σ is sampled (logit_normal, mode) or the loss weighted (sigma_sqrt, cosmap); none: uniform",
        choices=WEIGHTING_SCHEMES,
    )
    precondition_outputs: int = option(
        1, "1: score the clean-latent estimate x_σ − σ·v (EDM preconditioning), 0: the velocity", choices=(0, 1)
    )
    max_sequence_length: int = option(
        256, "T5 tokens per prompt in training and validation (StableDiffusion3Pipeline's default)", minimum=1
    )
    validation_guidance_scale: float = option(7.0, "guidance of validation images", minimum=0.0, same_run=False)
