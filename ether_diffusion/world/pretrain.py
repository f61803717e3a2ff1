"""Pretraining the tiny Stable Diffusion on the world: the VAE first, then UNet and text encoder jointly.

    ether-diffusion world pretrain --output_dir outputs/tiny-sd --export_dir assets/tiny-sd

Both phases draw batches from tensors held on the training device (the whole dataset is a few hundred MB),
so a step costs one forward and backward and nothing else. Checkpoints (``checkpoints``: safetensors and JSON, no
pickle) hold models, optimizers, EMA weights, the phase, step, latent scaling and RNG states, so
``--resume_from_checkpoint latest`` continues an interrupted run exactly: on the same device, a resumed run ends
with the weights of the uninterrupted one.

The defaults fit the 2-core CPU budget (docs/tiny_world.md has measured speeds); the shipped model was trained with
the GPU settings written in assets/tiny-sd/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoints import find_checkpoint, load_checkpoint, save_checkpoint
from .dataset import caption_variants, render_arrays
from .tiny_sd import (
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    count_parameters,
    save_pipeline_folder,
    training_scheduler,
)
from .tokenizer import encode_world_caption

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
def encode_latents(
    vae, pixels_u8: torch.Tensor, device, batch_size: int = 512, seed: int = 0
) -> tuple[torch.Tensor, float]:
    """Posterior means and stds of all images, and the scaling factor 1/std(latents) SD uses, measured on one
    sample of every posterior drawn from a generator of its own (seeded ``seed``): torch's global RNG stays as it
    was, so a run resumed after this point carries on with the same RNG state as the uninterrupted one."""
    vae.eval()
    means, stds = [], []
    for i in range(0, pixels_u8.shape[0], batch_size):
        with autocast(device):
            dist = vae.encode(pixels_u8[i : i + batch_size].float() / 127.5 - 1.0).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    mean, std = torch.cat(means), torch.cat(stds)
    noise = torch.randn(std.shape, generator=torch.Generator(device=std.device).manual_seed(seed), device=std.device)
    scaling = 1.0 / float((mean + std * noise).std())
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


# ------------------------------------------------------------------------------------------------ the run
def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/tiny-sd", help="checkpoints and the trained pipeline")
    p.add_argument("--export_dir", default=None, help="also write the pipeline here (e.g. assets/tiny-sd)")
    p.add_argument("--num_images", type=int, default=20000, help="rendered pretraining images")
    p.add_argument("--caption_variants", type=int, default=4, help="captions per image (1 full + dropped)")
    p.add_argument("--vae_steps", type=int, default=800)
    p.add_argument("--vae_batch_size", type=int, default=32)
    p.add_argument("--vae_learning_rate", type=float, default=1e-3)
    p.add_argument("--max_train_steps", type=int, default=6000, help="UNet + text-encoder steps")
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--lr_warmup_steps", type=int, default=200)
    p.add_argument("--ema_decay", type=float, default=0.999)
    p.add_argument("--snr_gamma", type=float, default=5.0)
    p.add_argument(
        "--time_budget_minutes",
        type=float,
        default=None,
        help="stop each phase after this share of wall time (vae 1/5, unet 4/5), lr decayed to it",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--render_workers", type=int, default=1, help="processes that render the dataset")
    p.add_argument("--checkpointing_steps", type=int, default=1000)
    p.add_argument("--checkpoints_total_limit", type=int, default=2, help="checkpoints kept (0: all)")
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-<step> folder")
    args = p.parse_args(argv)
    for name in ("num_images", "caption_variants", "vae_batch_size", "train_batch_size", "checkpointing_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.vae_steps < 0 or args.max_train_steps < 0:
        p.error("--vae_steps and --max_train_steps must be >= 0")
    if args.checkpoints_total_limit < 0:
        p.error("--checkpoints_total_limit must be >= 0 (0 keeps every checkpoint)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no GPU: use --device cpu")
    return args


def command_line(args: argparse.Namespace) -> str:
    """The ``ether-diffusion world pretrain`` command that repeats this run, every setting spelled out."""
    flags = [part for name, value in vars(args).items() if value is not None for part in (f"--{name}", str(value))]
    return shlex.join(["ether-diffusion", "world", "pretrain", *flags])


@dataclass
class Pretraining:
    """What a run trains and carries from step to step; ``state`` and ``load_state`` are its checkpoint."""

    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae_opt: torch.optim.Optimizer
    diff_opt: torch.optim.Optimizer
    emas: tuple[ExponentialMovingAverage, ExponentialMovingAverage]  # of the UNet and the text encoder
    generator: torch.Generator  # batches, noise and timesteps
    phase: str = "vae"  # "vae", then "diffusion"
    step: int = 0  # steps done in the phase
    scaling: float | None = None  # the latents' scaling factor, measured when the VAE phase ends
    args: dict = field(default_factory=dict)

    @classmethod
    def build(cls, args: argparse.Namespace, tokenizer, device: torch.device) -> Pretraining:
        vae, unet = build_vae().to(device), build_unet().to(device)
        text_encoder = build_text_encoder(tokenizer).to(device)
        return cls(
            vae=vae,
            unet=unet,
            text_encoder=text_encoder,
            vae_opt=torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0),
            diff_opt=torch.optim.AdamW(
                [*unet.parameters(), *text_encoder.parameters()], lr=args.learning_rate, weight_decay=1e-2
            ),
            emas=(
                ExponentialMovingAverage(unet, args.ema_decay),
                ExponentialMovingAverage(text_encoder, args.ema_decay),
            ),
            generator=torch.Generator(device=device).manual_seed(args.seed),
            args=vars(args),
        )

    def state(self) -> dict:
        """Everything a resumed run needs, tensors and plain values (``checkpoints`` stores it without pickle).
        Torch's own RNG states are in it too: the VAE phase samples its posteriors from them."""
        state = {
            "phase": self.phase,
            "step": self.step,
            "scaling": self.scaling,
            "args": self.args,
            "vae": self.vae.state_dict(),
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "diff_opt": self.diff_opt.state_dict(),
            "emas": [ema.state_dict() for ema in self.emas],
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.generator.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.generator.device)
        return state

    def load_state(self, state: dict) -> None:
        self.vae.load_state_dict(state["vae"])
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.vae_opt.load_state_dict(state["vae_opt"])  # moves its tensors to the parameters' device
        self.diff_opt.load_state_dict(state["diff_opt"])
        device = next(self.unet.parameters()).device
        for ema, saved in zip(self.emas, state["emas"]):
            ema.load_state_dict({**saved, "shadow": [s.to(device) for s in saved["shadow"]]})
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.generator.device)
        self.phase, self.step, self.scaling = state["phase"], state["step"], state["scaling"]

    def global_step(self, phase: str, step: int) -> int:
        """Steps since the start of the run: a checkpoint's number."""
        return step if phase == "vae" else self.args["vae_steps"] + step


def main(args: argparse.Namespace) -> Path:
    """Pretrain, write the pipeline into ``output_dir/pipeline`` (and ``--export_dir``); returns the last folder."""
    started = time.time()
    device = torch.device(args.device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    budget = args.time_budget_minutes * 60 if args.time_budget_minutes else None

    tokenizer = build_tokenizer(output_dir / "tokenizer")
    vocab = tokenizer.get_vocab()
    data = render_arrays(args.num_images, "pretrain", start=0, workers=args.render_workers)
    pixels = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous().to(device)  # (N, 3, H, W) uint8
    token_ids = torch.from_numpy(caption_variants(data.scenes, vocab, args.caption_variants, args.seed)).to(device)
    empty_ids = torch.tensor(encode_world_caption("", vocab), device=device)
    print(f"rendered {len(data.scenes)} images in {time.time() - started:.0f}s", flush=True)

    run = Pretraining.build(args, tokenizer, device)
    print(
        f"parameters: vae {count_parameters(run.vae):,} unet {count_parameters(run.unet):,} "
        f"text {count_parameters(run.text_encoder):,}",
        flush=True,
    )
    resume = find_checkpoint(output_dir, args.resume_from_checkpoint)
    if resume is not None:
        run.load_state(load_checkpoint(resume))
        print(f"resumed from {resume}: phase {run.phase}, step {run.step}", flush=True)

    def checkpoint(phase: str, step: int) -> None:
        if step % args.checkpointing_steps:
            return
        run.phase, run.step = phase, step
        save_checkpoint(output_dir, run.global_step(phase, step), run.state(), args.checkpoints_total_limit)

    timings = {}
    if run.phase == "vae":
        t0 = time.time()
        settings = PhaseSettings(
            args.vae_steps,
            args.vae_batch_size,
            args.vae_learning_rate,
            args.lr_warmup_steps,
            budget / 5 if budget else None,
        )
        done = train_vae_steps(
            run.vae, run.vae_opt, pixels, settings, run.step, device, run.generator, lambda s: checkpoint("vae", s)
        )
        timings["vae_seconds"], timings["vae_steps"] = round(time.time() - t0), done
        run.phase, run.step = "diffusion", 0
    run.vae.requires_grad_(False)
    latent_stats, measured_scaling = encode_latents(run.vae, pixels, device, seed=args.seed)
    run.scaling = run.scaling if run.scaling is not None else measured_scaling
    run.vae.register_to_config(scaling_factor=run.scaling)
    print(f"latents {tuple(latent_stats.shape)}, scaling factor {run.scaling:.4f}", flush=True)

    t0 = time.time()
    settings = PhaseSettings(
        args.max_train_steps,
        args.train_batch_size,
        args.learning_rate,
        args.lr_warmup_steps,
        budget * 4 / 5 if budget else None,
    )
    done = train_diffusion_steps(
        run.unet,
        run.text_encoder,
        run.diff_opt,
        run.emas,
        latent_stats,
        run.scaling,
        token_ids,
        empty_ids,
        settings,
        run.step,
        device,
        run.generator,
        lambda s: checkpoint("diffusion", s),
        args.snr_gamma,
    )
    timings["unet_seconds"], timings["unet_steps"] = round(time.time() - t0), done

    for module, ema in zip((run.unet, run.text_encoder), run.emas):
        ema.copy_to(module)
    info = {
        "command": command_line(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "args": vars(args),
        "total_seconds": round(time.time() - started),
        "scaling_factor": run.scaling,
        **timings,
    }
    targets = [output_dir / "pipeline"] + ([Path(args.export_dir)] if args.export_dir else [])
    for target in targets:
        parts = (run.text_encoder.float().cpu(), run.vae.float().cpu(), run.unet.float().cpu())
        save_pipeline_folder(target, tokenizer, *parts)
        (target / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), flush=True)
    return targets[-1]
