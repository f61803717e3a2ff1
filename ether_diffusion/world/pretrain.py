"""Pretraining the tiny Stable Diffusion on the world: the VAE first, then UNet and text encoder jointly.

Both phases draw batches from tensors held on the training device (the whole dataset is a few hundred MB),
so a step costs one forward and backward and nothing else. Checkpoints hold models, optimizers, EMA weights,
the step and the RNG state, so ``--resume_from_checkpoint latest`` continues an interrupted run exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .tiny_sd import training_scheduler

CFG_DROPOUT = 0.1  # fraction of captions replaced by the empty prompt, so classifier-free guidance works


class ExponentialMovingAverage:
    """EMA of a module's parameters; ``copy_to`` writes the averages into the module."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone().float() for p in module.parameters()]

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short warm-up: early averages follow the model
        for s, p in zip(self.shadow, module.parameters()):
            s.lerp_(p.detach().float(), 1 - decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for s, p in zip(self.shadow, module.parameters()):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = [s.clone() for s in state["shadow"]]


@dataclass
class PhaseSettings:
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 200
    time_budget_s: float | None = None  # stop early (and say so) when this much wall time has passed


def set_learning_rate(optimizer, settings: PhaseSettings, step: int, elapsed_s: float) -> float:
    """Linear warm-up, then cosine decay to 10 %. With a time budget, progress is whichever of steps and
    time is further along, so a run cut by the budget still ends with a decayed learning rate."""
    warm = min(1.0, (step + 1) / max(settings.warmup_steps, 1))
    progress = step / max(settings.steps, 1)
    if settings.time_budget_s:
        progress = max(progress, elapsed_s / settings.time_budget_s)
    lr = settings.learning_rate * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_dirs(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def save_checkpoint(output_dir: Path, global_step: int, state: dict, total_limit: int | None) -> Path:
    path = output_dir / f"checkpoint-{global_step}"
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(path / "state.pt")  # atomic: an interrupted save never leaves a half-written checkpoint
    if total_limit:
        for old in checkpoint_dirs(output_dir)[:-total_limit]:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    return path


def find_checkpoint(output_dir: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = checkpoint_dirs(output_dir)
        return found[-1] / "state.pt" if found else None
    path = Path(resume)
    path = path / "state.pt" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; pass 'latest' or a checkpoint-<step> folder")
    return path


# ------------------------------------------------------------------------------------------------ phase 1: VAE
def vae_loss(vae, pixels: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample()).sample
    rec = F.mse_loss(recon.float(), pixels) + 0.5 * F.l1_loss(recon.float(), pixels)
    kl = posterior.kl().mean() / pixels[0].numel()
    return rec + kl_weight * kl, {"rec": rec.item(), "kl": kl.item()}


def train_vae_steps(vae, optimizer, pixels_u8, settings, start_step, device, generator, on_step):
    """Train the VAE from ``start_step`` to ``settings.steps`` on (N, 3, H, W) uint8 images on ``device``."""
    vae.train()
    t0 = time.time()
    bar = tqdm(range(start_step, settings.steps), desc="vae", initial=start_step, total=settings.steps)
    for step in bar:
        idx = torch.randint(0, pixels_u8.shape[0], (settings.batch_size,), device=device, generator=generator)
        pixels = pixels_u8[idx].float() / 127.5 - 1.0
        set_learning_rate(optimizer, settings, step, time.time() - t0)
        with autocast(device):
            loss, logs = vae_loss(vae, pixels, kl_weight=1e-4)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(rec=f"{logs['rec']:.4f}", kl=f"{logs['kl']:.3f}")
        on_step(step + 1)
        if settings.time_budget_s and time.time() - t0 > settings.time_budget_s:
            tqdm.write(f"vae: time budget reached at step {step + 1}")
            return step + 1
    return settings.steps


@torch.no_grad()
def encode_latents(vae, pixels_u8: torch.Tensor, device, batch_size: int = 512) -> tuple[torch.Tensor, float]:
    """Posterior means and stds of all images, and the scaling factor 1/std(latents) SD uses."""
    vae.eval()
    means, stds = [], []
    for i in range(0, pixels_u8.shape[0], batch_size):
        with autocast(device):
            dist = vae.encode(pixels_u8[i : i + batch_size].float() / 127.5 - 1.0).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    mean, std = torch.cat(means), torch.cat(stds)
    scaling = 1.0 / float((mean + std * torch.randn_like(std)).std())
    return torch.stack([mean, std], dim=1), scaling


# ----------------------------------------------------------------------------------- phase 2: UNet + text
def diffusion_loss(unet, text_encoder, latents, input_ids, noise_scheduler, generator, snr_gamma: float):
    """Epsilon-prediction loss with min-SNR weighting (Hang et al. 2023): weight min(SNR, gamma) / SNR."""
    b = latents.shape[0]
    device = latents.device
    noise = torch.randn(latents.shape, device=device, generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), device=device, generator=generator)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    hidden = text_encoder(input_ids)[0]
    pred = unet(noisy, timesteps, hidden).sample
    alphas = noise_scheduler.alphas_cumprod.to(device)[timesteps]
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=snr_gamma) / snr
    per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    return (weight * per_sample).mean()


def train_diffusion_steps(
    unet,
    text_encoder,
    optimizer,
    emas,
    latent_stats,  # (N, 2, 4, h, w): posterior mean and std
    scaling: float,
    token_ids,  # (N, variants, L)
    empty_ids,  # (L,)
    settings: PhaseSettings,
    start_step: int,
    device,
    generator,
    on_step,
    snr_gamma: float = 5.0,
):
    noise_scheduler = training_scheduler()
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    unet.train()
    text_encoder.train()
    params = [p for m in (unet, text_encoder) for p in m.parameters()]
    t0 = time.time()
    bar = tqdm(range(start_step, settings.steps), desc="unet+text", initial=start_step, total=settings.steps)
    for step in bar:
        n, variants = token_ids.shape[:2]
        idx = torch.randint(0, n, (settings.batch_size,), device=device, generator=generator)
        stats = latent_stats[idx]
        eps = torch.randn(stats[:, 0].shape, device=device, generator=generator)
        latents = (stats[:, 0] + stats[:, 1] * eps) * scaling
        which = torch.randint(0, variants, (settings.batch_size,), device=device, generator=generator)
        ids = token_ids[idx, which]
        drop = torch.rand(settings.batch_size, device=device, generator=generator) < CFG_DROPOUT
        ids = torch.where(drop[:, None], empty_ids[None], ids)
        lr = set_learning_rate(optimizer, settings, step, time.time() - t0)
        with autocast(device):
            loss = diffusion_loss(unet, text_encoder, latents, ids, noise_scheduler, generator, snr_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        for module, ema in zip((unet, text_encoder), emas):
            ema.update(module, step)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
        on_step(step + 1)
        if settings.time_budget_s and time.time() - t0 > settings.time_budget_s:
            tqdm.write(f"unet+text: time budget reached at step {step + 1}")
            return step + 1
    return settings.steps
