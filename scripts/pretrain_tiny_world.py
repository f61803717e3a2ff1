"""Pretrain the tiny Stable Diffusion of the procedural world (VAE, then UNet + text encoder) from scratch.

    python scripts/pretrain_tiny_world.py --output_dir outputs/tiny-sd --export_dir assets/tiny-sd

The defaults fit the 2-core CPU budget (see docs/tiny_world.md for measured speeds); the shipped model was
trained with the GPU settings written in assets/tiny-sd/README.md. Interrupted? Run the same command with
``--resume_from_checkpoint latest``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from ether_diffusion.world.dataset import caption_variants, render_arrays
from ether_diffusion.world.pretrain import (
    ExponentialMovingAverage,
    PhaseSettings,
    encode_latents,
    find_checkpoint,
    save_checkpoint,
    train_diffusion_steps,
    train_vae_steps,
)
from ether_diffusion.world.tiny_sd import (
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    count_parameters,
    save_pipeline_folder,
)
from ether_diffusion.world.tokenizer import encode_world_caption


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--checkpoints_total_limit", type=int, default=2)
    p.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder")
    args = p.parse_args(argv)
    for name in (
        "num_images",
        "caption_variants",
        "vae_batch_size",
        "train_batch_size",
        "checkpointing_steps",
    ):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.vae_steps < 0 or args.max_train_steps < 0:
        p.error("--vae_steps and --max_train_steps must be >= 0")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda asked for, but torch sees no GPU: use --device cpu")
    return args


def main(args):
    started = time.time()
    device = torch.device(args.device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    budget = args.time_budget_minutes * 60 if args.time_budget_minutes else None

    tokenizer = build_tokenizer(output_dir / "tokenizer")
    vocab = tokenizer.get_vocab()
    data = render_arrays(args.num_images, "pretrain", start=0, workers=args.render_workers)
    pixels = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous().to(device)  # (N, 3, H, W) uint8
    token_ids = torch.from_numpy(caption_variants(data.scenes, vocab, args.caption_variants, args.seed)).to(device)
    empty_ids = torch.tensor(encode_world_caption("", vocab), device=device)
    print(f"rendered {len(data.scenes)} images in {time.time() - started:.0f}s", flush=True)

    vae, unet, text_encoder = (
        build_vae().to(device),
        build_unet().to(device),
        build_text_encoder(tokenizer).to(device),
    )
    print(
        f"parameters: vae {count_parameters(vae):,} unet {count_parameters(unet):,} "
        f"text {count_parameters(text_encoder):,}",
        flush=True,
    )
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    diff_opt = torch.optim.AdamW(
        [*unet.parameters(), *text_encoder.parameters()], lr=args.learning_rate, weight_decay=1e-2
    )
    emas = (
        ExponentialMovingAverage(unet, args.ema_decay),
        ExponentialMovingAverage(text_encoder, args.ema_decay),
    )
    phase, step, scaling = "vae", 0, None

    resume = find_checkpoint(output_dir, args.resume_from_checkpoint)
    if resume is not None:
        state = torch.load(resume, map_location=device, weights_only=False)
        vae.load_state_dict(state["vae"])
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        vae_opt.load_state_dict(state["vae_opt"])
        diff_opt.load_state_dict(state["diff_opt"])
        for ema, s in zip(emas, state["emas"]):
            ema.load_state_dict(s)
        generator.set_state(state["generator"].cpu())
        phase, step, scaling = state["phase"], state["step"], state["scaling"]
        print(f"resumed from {resume}: phase {phase}, step {step}", flush=True)

    def checkpoint(current_phase: str, current_step: int) -> None:
        if current_step % args.checkpointing_steps:
            return
        state = {
            "phase": current_phase,
            "step": current_step,
            "scaling": scaling,
            "vae": vae.state_dict(),
            "unet": unet.state_dict(),
            "text_encoder": text_encoder.state_dict(),
            "vae_opt": vae_opt.state_dict(),
            "diff_opt": diff_opt.state_dict(),
            "emas": [e.state_dict() for e in emas],
            "generator": generator.get_state(),
            "args": vars(args),
        }
        save_checkpoint(
            output_dir,
            (0 if current_phase == "vae" else args.vae_steps) + current_step,
            state,
            args.checkpoints_total_limit,
        )

    timings = {}
    if phase == "vae":
        t0 = time.time()
        vae_settings = PhaseSettings(
            args.vae_steps,
            args.vae_batch_size,
            args.vae_learning_rate,
            args.lr_warmup_steps,
            budget / 5 if budget else None,
        )
        vae_done = train_vae_steps(
            vae, vae_opt, pixels, vae_settings, step, device, generator, lambda s: checkpoint("vae", s)
        )
        timings["vae_seconds"], timings["vae_steps"] = round(time.time() - t0), vae_done
        phase, step = "diffusion", 0
    vae.requires_grad_(False)
    latent_stats, measured_scaling = encode_latents(vae, pixels, device)
    scaling = scaling if scaling is not None else measured_scaling
    vae.register_to_config(scaling_factor=scaling)
    print(f"latents {tuple(latent_stats.shape)}, scaling factor {scaling:.4f}", flush=True)

    t0 = time.time()
    settings = PhaseSettings(
        args.max_train_steps,
        args.train_batch_size,
        args.learning_rate,
        args.lr_warmup_steps,
        budget * 4 / 5 if budget else None,
    )
    done = train_diffusion_steps(
        unet,
        text_encoder,
        diff_opt,
        emas,
        latent_stats,
        scaling,
        token_ids,
        empty_ids,
        settings,
        step,
        device,
        generator,
        lambda s: checkpoint("diffusion", s),
        args.snr_gamma,
    )
    timings["unet_seconds"], timings["unet_steps"] = round(time.time() - t0), done

    for module, ema in zip((unet, text_encoder), emas):
        ema.copy_to(module)
    info = {
        "command": "python " + shlex.join(sys.argv) if argv_was_cli() else "main(parse_args([...]))",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "args": vars(args),
        "total_seconds": round(time.time() - started),
        "scaling_factor": scaling,
        **timings,
    }
    targets = [output_dir / "pipeline"] + ([Path(args.export_dir)] if args.export_dir else [])
    for target in targets:
        save_pipeline_folder(target, tokenizer, text_encoder.float().cpu(), vae.float().cpu(), unet.float().cpu())
        (target / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info), flush=True)
    return targets[-1]


def argv_was_cli() -> bool:
    return Path(sys.argv[0]).name == Path(__file__).name


if __name__ == "__main__":
    main(parse_args())
