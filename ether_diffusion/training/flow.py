"""Flow matching on the library's loop: what SD3 and Flux DreamBooth share (``sd3.py`` and ``flux.py`` add the models).

SD3 and Flux are rectified flows. An image's latents x₀ and Gaussian noise ε are joined by a straight line, and the
transformer learns the velocity along it::

    x_σ = (1 − σ) x₀ + σ ε,        v = dx_σ/dσ = ε − x₀,        σ ∈ (0, 1]  (σ = t / 1000 of the scheduler)

Training follows diffusers' ``train_dreambooth_lora_sd3.py`` / ``train_dreambooth_lora_flux.py`` (SD3 paper,
Esser et al. 2024, section 3.1):

- **which σ**: ``u`` is drawn from the density of ``--weighting_scheme`` (``logit_normal``: sigmoid of
  N(``--logit_mean``, ``--logit_std``²), most mass at mid noise; ``mode`` with ``--mode_scale``; otherwise uniform)
  by diffusers' ``compute_density_for_timestep_sampling``; ``⌊u · N⌋`` indexes the scheduler's training schedule
  (``FlowMatchEulerDiscreteScheduler`` as configured: SD3's ``shift=3`` already bent into its σ's);
- **the loss**: ``w(σ) · ‖prediction − target‖²`` per sample, ``w`` from diffusers' ``compute_loss_weighting_for_sd3``
  (``sigma_sqrt``: σ⁻², ``cosmap``: 2 / (π (1 − 2σ + 2σ²)), the others 1: they put their weight into the sampling);
- **the target**: the velocity ε − x₀, or, with ``--precondition_outputs 1`` (SD3's default, as diffusers), the clean
  latents x₀ against the estimate x_σ − σ · v̂ (EDM's output preconditioning; its error is σ times the velocity's);
- prior preservation as DreamBooth's: the batch is ``[instance; class]``, the class half weighted by
  ``--prior_loss_weight``.

``FlowMatchingBackend`` is the SD backend (``sd.py``) with a ``transformer`` denoiser and this loss; its subclasses say
how the model is conditioned (``condition``) and called (``predict``). ``FlowMatchingOptions`` holds the flags.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch

from ..models import load_pipeline
from .config import ConfigError, ForeignFlag, option
from .diffusion import combine_prior, sample_noise
from .run import Run
from .sd import StableDiffusionBackend

__all__ = [
    "FLOW_FOREIGN_FLAGS",
    "WEIGHTING_SCHEMES",
    "FlowComponents",
    "FlowMatchingBackend",
    "FlowMatchingOptions",
    "flow_matching_loss",
    "noisy_latents",
    "sample_timesteps",
]

#: diffusers' ``--weighting_scheme`` choices: how σ is sampled (logit_normal, mode) or the loss weighted (sigma_sqrt,
#: cosmap); none: uniform σ, weight 1.
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")


# --- the objective ----------------------------------------------------------------------------------------------------
def sample_timesteps(
    scheduler,
    batch_size: int,
    generator: torch.Generator,
    weighting_scheme: str = "none",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, sigmas)``, each (B,), drawn from ``scheduler``'s training schedule with ``weighting_scheme``'s
    density, on the generator's device.

    ``scheduler`` must hold the training schedule (as constructed: ``timesteps[i] = sigmas[i] · N``); one that has
    been ``set_timesteps`` for sampling is refused. diffusers looks each drawn timestep up in the schedule to find its
    σ; the same index gives it directly.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    count = scheduler.config.num_train_timesteps
    if len(scheduler.timesteps) != count or len(scheduler.sigmas) != count:
        raise ValueError(
            f"the scheduler holds {len(scheduler.timesteps)} timesteps, not its {count} training ones: it was set up "
            "for sampling; train with a fresh one (FlowMatchEulerDiscreteScheduler.from_config(scheduler.config))"
        )
    u = compute_density_for_timestep_sampling(
        weighting_scheme, batch_size, logit_mean, logit_std, mode_scale, device=generator.device, generator=generator
    )
    # u lies in [0, 1] (a float32 sigmoid rounds to 1.0 from 17 up, and "mode" reaches 1 at u = 0): keep index N out
    indices = (u * count).long().clamp(0, count - 1).cpu()
    return scheduler.timesteps[indices].to(generator.device), scheduler.sigmas[indices].to(generator.device)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ) x₀ + σ ε, with ``sigmas`` (B,) broadcast over each sample."""
    sigmas = sigmas.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return (1.0 - sigmas) * latents + sigmas * noise


def flow_matching_loss(
    prediction: torch.Tensor,
    latents: torch.Tensor,
    noise: torch.Tensor,
    noisy: torch.Tensor,
    sigmas: torch.Tensor,
    weighting_scheme: str = "none",
    precondition_outputs: bool = False,
    with_prior_preservation: bool = False,
    prior_loss_weight: float = 1.0,
):
    """The weighted flow-matching loss of a velocity ``prediction`` at ``noisy`` = x_σ (see the module docstring).
    Returns (loss, parts) as ``diffusion.dreambooth_loss`` does."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigma = sigmas.float().view(-1, *([1] * (latents.dim() - 1)))  # (B, 1, 1, 1)
    if precondition_outputs:  # the clean latents against the estimate x_σ − σ v̂
        estimate, target = noisy.float() - sigma * prediction.float(), latents.float()
    else:  # the velocity v = ε − x₀
        estimate, target = prediction.float(), noise.float() - latents.float()
    weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigma)
    per_sample = (weighting * (estimate - target) ** 2).flatten(1).mean(dim=1)
    return combine_prior(per_sample, with_prior_preservation, prior_loss_weight)


# --- the configuration ------------------------------------------------------------------------------------------------
#: flags of diffusers' SD3/Flux scripts answered without a field
FLOW_FOREIGN_FLAGS = {
    "lora_layers": ForeignFlag(
        "it names the layers LoRA adapts; ETHER's are named by --target_modules (a preset such as sd3-attention, "
        "flux-attention, flux-attention-ff, or comma-separated module-path suffixes)",
        takes_value=True,
    ),
    "lora_alpha": ForeignFlag(
        "ETHER has no rank for an alpha to scale: an adapter acts at full strength, and its strength is set where "
        "it is used (load_ether_weights/set_ether_adapters weights, sample's adapter:0.8, export --strength). "
        "Drop --lora_alpha",
        takes_value=True,
    ),
    "upcast_before_saving": ForeignFlag(
        "the adapter's vectors train and are saved in float32 whatever --mixed_precision is", accepted=True
    ),
    "enable_npu_flash_attention": ForeignFlag(
        "it is for Huawei Ascend NPUs (torch_npu); here the attention is torch's scaled-dot-product attention, "
        "memory-efficient on CUDA, MPS and CPU alike. Drop the flag",
    ),
    "lora_blocks": ForeignFlag(
        "it picks the transformer blocks LoRA adapts; with ETHER give --target_modules the module-path suffixes "
        "of the blocks' layers to adapt (e.g. transformer_blocks.0.attn.to_q,transformer_blocks.0.attn.to_k)",
        takes_value=True,
    ),
}


@dataclass(kw_only=True)
class FlowMatchingOptions:
    """The flags of flow matching (diffusers' names) a task's configuration takes on SD3 or Flux; ``sd3.py`` and
    ``flux.py`` set the models' defaults. Refuses the DDPM-only flags of the configuration it joins."""

    weighting_scheme: str = option(
        "none",
        "how σ is sampled (logit_normal, mode) or the loss weighted (sigma_sqrt, cosmap); none: uniform",
        choices=WEIGHTING_SCHEMES,
    )
    logit_mean: float = option(0.0, "mean of the logit_normal weighting scheme")
    logit_std: float = option(1.0, "standard deviation of the logit_normal weighting scheme", minimum=0.0)
    mode_scale: float = option(1.29, "scale of the mode weighting scheme")
    precondition_outputs: int = option(
        0, "1: score the clean-latent estimate x_σ − σ·v (EDM preconditioning), 0: the velocity", choices=(0, 1)
    )
    max_sequence_length: int = option(512, "T5 tokens per prompt in training and validation", minimum=1)
    validation_scheduler: str = option(
        "FlowMatchEulerDiscreteScheduler", "sampler of validation images and the final reload (the model's own: "
        "a flow-matching model samples with flow-matching Euler steps)", choices=("FlowMatchEulerDiscreteScheduler",),
        same_run=False,
    )  # fmt: skip

    def validate(self):
        super().validate()
        if self.snr_gamma is not None:
            raise ConfigError(
                "--snr_gamma is min-SNR weighting for DDPM models (SD 1.x/2.x, SDXL); a flow-matching model weighs its "
                f"loss with --weighting_scheme ({', '.join(WEIGHTING_SCHEMES)}): drop --snr_gamma"
            )
        if getattr(self, "offset_noise", False):
            raise ConfigError("--offset_noise is for DDPM models (SD 1.x/2.x, SDXL); flow-matching training has none")
        if self.tokenizer_name:
            raise ConfigError("--tokenizer_name replaces the one tokenizer of an SD 1.x/2.x model; drop the flag")
        if getattr(self, "tokenizer_max_length", None) is not None:
            raise ConfigError(
                "--tokenizer_max_length sets the CLIP length of SD 1.x/2.x and SDXL; SD3 and Flux read 77 CLIP tokens "
                "as their pipelines do, and --max_sequence_length sets T5's: use that"
            )
        if getattr(self, "text_encoder_use_attention_mask", False):
            raise ConfigError(
                "--text_encoder_use_attention_mask: the SD3 and Flux pipelines read their text encoders without a "
                "padding mask, so an adapter trained with one would be sampled differently from how it was trained; "
                "drop the flag"
            )
        if self.enable_xformers_memory_efficient_attention:
            raise ConfigError(
                "--enable_xformers_memory_efficient_attention: the SD3 and Flux transformers' joint attention runs "
                "on torch's scaled-dot-product attention (as memory-efficient on torch 2); drop the flag"
            )
        return self


# --- the task ---------------------------------------------------------------------------------------------------------
@dataclass
class FlowComponents:
    """A flow-matching model's parts: the loaded pipeline's components by name, and the training schedule."""

    modules: dict  # tokenizers, text encoders, vae, transformer, scheduler, ... as the pipeline takes them
    noise_scheduler: object  # a FlowMatchEulerDiscreteScheduler holding the training schedule (never set to sample)
    path: str
    native_resolution: int  # the pipeline's default image size
    vae_scale_factor: int

    @property
    def vae(self):
        return self.modules["vae"]

    @property
    def transformer(self):
        return self.modules["transformer"]


class FlowMatchingBackend(StableDiffusionBackend):
    """A transformer denoiser trained on flow matching; subclasses give the model's ``condition`` and ``predict`` and
    the ``latent_multiple`` its image sizes must divide into."""

    denoiser_component = "transformer"
    captures_step = False

    def load_components(self) -> FlowComponents:
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = self.config
        pipe = load_pipeline(
            config.pretrained_model_name_or_path,
            self.pipeline_class(),
            config=config.model_config,
            original_config=config.original_config,
            revision=config.revision,
            variant=config.variant,
        )
        return FlowComponents(
            modules=dict(pipe.components),
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config),
            path=str(config.pretrained_model_name_or_path),
            native_resolution=pipe.default_sample_size * pipe.vae_scale_factor,
            vae_scale_factor=pipe.vae_scale_factor,
        )

    def latent_multiple(self) -> int:
        """Latent height and width must be multiples of this (the transformer's patch size)."""
        return 1

    def check_components(self) -> None:
        multiple, resolution = self.components.vae_scale_factor * self.latent_multiple(), self.config.resolution
        if resolution % multiple:
            nearest = max(multiple, resolution // multiple * multiple)
            raise ConfigError(
                f"--resolution {resolution} does not fit this model, whose transformer takes images in "
                f"{multiple}-pixel patches: use a multiple of {multiple}, e.g. {nearest}"
            )

    def t5_tokenizer(self, name: str):
        """The T5 tokenizer ``name`` cutting prompts at ``--max_sequence_length`` tokens (a copy: the pipeline's own is
        untouched), for the dataset, which pads to ``model_max_length``."""
        tokenizer = copy.copy(self.components.modules[name])
        tokenizer.model_max_length = self.config.max_sequence_length
        return tokenizer

    def text_encoder_adapter_config(self, component: str, denoiser_config):
        # the transformer's exclusions (SD3's unread context queries) name transformer layers: not the encoders'
        return dataclasses.replace(super().text_encoder_adapter_config(component, denoiser_config), exclude_modules=[])

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: dict, run: Run) -> torch.Tensor:
        """The transformer's velocity prediction for ``noisy`` latents (B, C, H, W), in that shape."""
        raise NotImplementedError

    def denoising_loss(
        self,
        batch: dict,
        run: Run,
        offset_noise: float = 0.0,
        prior_preservation: bool = False,
        prior_loss_weight: float = 1.0,
    ):
        """Move ``batch["pixel_values"]``'s latents along the flow to σ's drawn by the weighting scheme and score the
        transformer's velocity (see the module docstring); ``offset_noise`` is refused by the config."""
        config, parts, generator = self.config, self.components, run.noise_generator
        vae = parts.vae
        latents = self.latent_distribution(batch, run).sample(generator=generator)  # --cache_latents: cached
        latents = ((latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor).to(run.weight_dtype)
        noise = sample_noise(latents, generator, offset_noise)
        timesteps, sigmas = sample_timesteps(
            parts.noise_scheduler,
            latents.shape[0],
            generator,
            config.weighting_scheme,
            config.logit_mean,
            config.logit_std,
            config.mode_scale,
        )
        noisy = noisy_latents(latents, noise, sigmas)
        prediction = self.predict(noisy, timesteps.to(latents.device), self.condition(batch, run), run)
        return flow_matching_loss(
            prediction,
            latents,
            noise,
            noisy,
            sigmas,
            config.weighting_scheme,
            bool(config.precondition_outputs),
            prior_preservation,
            prior_loss_weight,
        )

    # --- sampling -----------------------------------------------------------------------------------------------
    def validation_scheduler(self, scheduler_config):
        """The model's own flow-matching sampler (the only ``--validation_scheduler`` these models take)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def _at_training_size(self, pipe):
        """Validation samples and class images are drawn at ``--resolution`` (the pipeline's own default is 1024)."""
        pipe.default_sample_size = self.config.resolution // pipe.vae_scale_factor
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline(self, pipeline_class=None, device=None):
        """A pipeline over the training modules (adapters as they are now) with a fresh copy of the model's own
        flow-matching scheduler (sampling sets its timesteps; the training schedule must not change)."""
        parts = self.components
        scheduler = self.validation_scheduler(parts.noise_scheduler.config)
        return self._at_training_size(
            (pipeline_class or self.pipeline_class())(**{**parts.modules, "scheduler": scheduler})
        )

    def fresh_pipeline(self, pipeline_class=None, device=None, scheduler: str | None = None, **kwargs):
        """The base model loaded anew, with its own flow-matching scheduler (DPM-Solver++ serves the DDPM families)."""
        return self._at_training_size(super().fresh_pipeline(pipeline_class, device, None, **kwargs))

    def validation_images(self, pipe, prompt: str, run: Run | None, **kwargs) -> list:
        return super().validation_images(
            pipe, prompt, run, max_sequence_length=self.config.max_sequence_length, **kwargs
        )
