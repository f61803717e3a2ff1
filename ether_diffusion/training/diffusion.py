"""Noise, targets and the DreamBooth loss (prior preservation, min-SNR weighting, offset noise)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["combine_prior", "compute_snr", "dreambooth_loss", "prediction_target", "sample_noise"]


def compute_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each timestep."""
    alphas = noise_scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas / (1.0 - alphas)


def sample_noise(latents: torch.Tensor, generator: torch.Generator, offset_noise: float = 0.0) -> torch.Tensor:
    """Gaussian noise like ``latents``; ``offset_noise`` adds a per-channel constant (lets the model learn very
    dark or bright images, as diffusers' ``--offset_noise`` does with 0.1)."""
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if offset_noise:
        shape = (latents.shape[0], latents.shape[1], 1, 1)
        noise = noise + offset_noise * torch.randn(
            shape, generator=generator, device=latents.device, dtype=latents.dtype
        )
    return noise


def prediction_target(noise_scheduler, latents, noise, timesteps):
    """What the UNet learns to predict, by the scheduler's ``prediction_type``: the noise ε (SD 1.x, SDXL), or the
    velocity v = √ᾱ_t ε − √(1 − ᾱ_t) x₀ (SD 2.x 768-v models)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; ETHER training supports 'epsilon' and 'v_prediction'")


def dreambooth_loss(
    prediction,
    target,
    timesteps,
    noise_scheduler,
    snr_gamma: float | None = None,
    with_prior_preservation: bool = False,
    prior_loss_weight: float = 1.0,
):
    """MSE loss; with prior preservation the batch is ``[instance; class]`` and the class half is weighted by
    ``prior_loss_weight``. ``snr_gamma`` applies min-SNR weighting (Hang et al. 2023). Returns (loss, parts)."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
        dim=tuple(range(1, prediction.dim()))
    )
    if snr_gamma is not None:
        # min-SNR-γ (Hang et al. 2023) is min(snr, γ)/snr on the epsilon error. A v error is (snr + 1)/snr times
        # the epsilon error of the same prediction, so on v it is min(snr, γ)/(snr + 1), as diffusers weights it
        snr = compute_snr(noise_scheduler, timesteps)
        clipped = torch.clamp(snr, max=snr_gamma)
        v_target = noise_scheduler.config.prediction_type == "v_prediction"
        per_sample = per_sample * (clipped / (snr + 1) if v_target else clipped / snr)
    return combine_prior(per_sample, with_prior_preservation, prior_loss_weight)


def combine_prior(per_sample: torch.Tensor, with_prior_preservation: bool = False, prior_loss_weight: float = 1.0):
    """The batch loss from per-sample losses (B,): their mean, or with prior preservation (the batch is ``[instance;
    class]``) the instance half's mean plus ``prior_loss_weight`` times the class half's. Returns (loss, parts)."""
    if not with_prior_preservation:
        loss = per_sample.mean()
        return loss, {"loss": loss.detach()}
    instance, prior = per_sample.chunk(2)
    instance_loss, prior_loss = instance.mean(), prior.mean()
    loss = instance_loss + prior_loss_weight * prior_loss
    return loss, {"loss": loss.detach(), "instance_loss": instance_loss.detach(), "prior_loss": prior_loss.detach()}
