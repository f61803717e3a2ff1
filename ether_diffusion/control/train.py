"""Training controllable synthesis: a condition encoder plus ETHER adapters on a frozen Stable Diffusion.

The flags follow diffusers' ``train_controlnet.py`` (dataset columns, validation images and prompts, checkpoints,
resume, mixed precision), plus the ETHER knobs and ``--encoder_learning_rate``. Used by
``scripts/train_control_ether.py`` and ``ether-diffusion demo --task control``. Run under ``accelerate launch`` or
plain ``python``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import TARGET_PRESETS
from ..inject import adapter_parameters, inject, load_adapter_state_dict
from ..io import read_adapter_file
from ..training.checkpoints import save_checkpoint
from ..training.data import EpochShuffleSampler
from ..training.diffusion import dreambooth_loss, prediction_target, sample_noise
from ..training.dreambooth import (
    TrainCallbacks,
    TrainResult,
    _check_output_dir,
    _GeneratorState,
    add_ether_arguments,
    add_loop_arguments,
    add_model_arguments,
    check_loop_args,
    check_replicas_agree,
    load_components,
    make_grid,
    release_wrappers,
    resume_state,
    sampling_pipeline,
    unet_ether_config,
)
from .data import ControlDataset, _open_image, collate
from .encoder import ConditionEncoder, ConditionEncoderConfig, attach_condition_encoder, set_condition
from .pipeline import CONTROL_WEIGHT_NAME, EtherControlPipeline, encoder_from_file, save_control_weights

__all__ = ["build_parser", "parse_args", "train", "validate_args"]

PAPER_LEARNING_RATE = 1e-3  # ETHER / ETHER+ on segmentation→image (Bini et al. 2024)
PAPER_ENCODER_LEARNING_RATE = 1e-4  # the encoder's rate is capped at 1e-4 in the paper's setup


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Controllable synthesis: condition encoder + ETHER (flags as diffusers' train_controlnet)"
    )
    a = p.add_argument
    add_model_arguments(a)
    a("--train_data_dir", required=True, help="folder with metadata.jsonl (image, conditioning_image, text)")
    a("--image_column", default="image")
    a("--conditioning_image_column", default="conditioning_image")
    a("--caption_column", default="text")
    a("--max_train_samples", type=int, default=None)
    a("--proportion_empty_prompts", type=float, default=0.0)
    a("--resolution", type=int, default=None, help="default: the model's native size")
    a("--dataloader_num_workers", type=int, default=0)
    a("--validation_prompt", nargs="+", default=None)
    a("--validation_image", nargs="+", default=None, help="control images for validation")
    a("--num_validation_images", type=int, default=2, help="images per (prompt, control) pair")
    a("--validation_steps", type=int, default=None, help="validate every N steps (and at step 0)")
    a("--validation_inference_steps", type=int, default=25)
    a("--validation_guidance_scale", type=float, default=5.0)
    add_ether_arguments(a, "unet-attention-ff")  # the paper's control targets: attention + GEGLU input projection
    a("--no_adapters", action="store_true", help="train the condition encoder alone (the paper's baseline)")
    a("--adapter_name", default="control")
    a("--output_dir", default="ether-control")
    add_loop_arguments(a, PAPER_LEARNING_RATE, train_batch_size=4)
    a("--encoder_learning_rate", type=float, default=PAPER_ENCODER_LEARNING_RATE)
    a("--tracker_project_name", default="ether-control")
    return p


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    def fail(message: str):
        if parser is not None:
            parser.error(message)
        raise ValueError(message)

    check_loop_args(args, fail)
    if args.encoder_learning_rate <= 0:
        fail("--encoder_learning_rate must be positive")
    for name in ("num_validation_images", "validation_steps", "max_train_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name} must be at least 1")
    prompts, images = args.validation_prompt or [], args.validation_image or []
    if bool(prompts) != bool(images):
        fail("--validation_prompt and --validation_image go together: give both or neither")
    if prompts and len(prompts) != len(images) and 1 not in (len(prompts), len(images)):
        fail(f"{len(prompts)} validation prompts for {len(images)} images: give one of either, or as many of each")
    for path in images:
        if not Path(path).is_file():
            fail(f"--validation_image '{path}' does not exist")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        fail("--proportion_empty_prompts must lie in [0, 1]")
    if args.target_modules not in TARGET_PRESETS and not args.target_modules.strip(", "):
        fail("--target_modules is empty")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    return validate_args(parser.parse_args(argv), parser)


def validation_pairs(args) -> list[tuple[str, Path]]:
    prompts, images = args.validation_prompt or [], args.validation_image or []
    if len(prompts) == 1:
        prompts = prompts * len(images)
    if len(images) == 1:
        images = images * len(prompts)
    return list(zip(prompts, map(Path, images)))


def sample_controls(pipe, pairs, args, device) -> list:
    """Per (prompt, control) pair: the control image, then ``num_validation_images`` samples."""
    images = []
    for i, (prompt, control_path) in enumerate(pairs):
        control = _open_image(control_path, "validation image").convert("RGB")
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        if control.size != (size, size):
            control = control.resize((size, size), 0)  # nearest: class colours stay exact
        generators = [
            torch.Generator("cpu").manual_seed(args.seed + 1000 * i + j) for j in range(args.num_validation_images)
        ]
        out = pipe(
            [prompt] * args.num_validation_images,
            image=control,
            generator=generators,
            num_inference_steps=args.validation_inference_steps,
            guidance_scale=args.validation_guidance_scale,
        ).images
        images += [control, *out]
    return images


def train(args: argparse.Namespace, callbacks: TrainCallbacks | None = None) -> TrainResult:  # noqa: C901
    """Train a condition encoder (+ ETHER adapters) as configured by ``args`` (see ``build_parser``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    callbacks = callbacks or TrainCallbacks()
    output_dir = Path(args.output_dir)
    _check_output_dir(output_dir)
    report_to = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_components(args)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = args.resolution or unet.config.sample_size * vae_scale_factor
    dataset = ControlDataset(
        args.train_data_dir,
        tokenizer,
        resolution,
        args.image_column,
        args.conditioning_image_column,
        args.caption_column,
        args.proportion_empty_prompts,
        args.seed,
        args.max_train_samples,
    )

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
    vae.to(accelerator.device, dtype=torch.float32 if weight_dtype == torch.float16 else weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    if not args.no_adapters:
        inject(unet, unet_ether_config(args), args.adapter_name)
    unet.to(accelerator.device, dtype=weight_dtype)
    encoder = ConditionEncoder(ConditionEncoderConfig.for_model(unet, vae_scale_factor)).to(accelerator.device)
    attach_condition_encoder(unet, encoder)
    adapter_params = [] if args.no_adapters else adapter_parameters(unet, args.adapter_name)
    for p in adapter_params:
        p.data = p.data.float()
        p.requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    scale = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes if args.scale_lr else 1
    groups = [{"params": list(encoder.parameters()), "lr": args.encoder_learning_rate * scale}]
    if adapter_params:
        groups.append({"params": adapter_params, "lr": args.learning_rate * scale})
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(
        groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon
    )
    sampler = EpochShuffleSampler(len(dataset), seed=args.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        drop_last=len(dataset) >= args.train_batch_size,
    )
    batches_per_epoch = max(1, len(loader) // accelerator.num_processes)
    updates_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    trained = [encoder] + ([unet] if adapter_params else [])
    prepared = accelerator.prepare(*trained, optimizer, loader, lr_scheduler)
    encoder_run = prepared[0]
    unet_run = prepared[1] if adapter_params else unet
    optimizer, loader, lr_scheduler = prepared[len(trained) :]
    params = [p for group in groups for p in group["params"]]

    def save_hook(hook_models, weights, folder):
        if accelerator.is_main_process:
            save_control_weights(
                Path(folder) / CONTROL_WEIGHT_NAME, unet, encoder, args.adapter_name, args.pretrained_model_name_or_path
            )
        weights.clear()

    def load_hook(hook_models, folder):
        source = read_adapter_file(Path(folder) / CONTROL_WEIGHT_NAME)
        encoder.load_state_dict(encoder_from_file(source, folder).state_dict())
        if adapter_params:
            load_adapter_state_dict(unet, args.adapter_name, source.component_state("unet"))
        hook_models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    noise_generator = torch.Generator(device=accelerator.device).manual_seed(args.seed + accelerator.process_index)
    accelerator.register_for_checkpointing(_GeneratorState(noise_generator))
    if accelerator.is_main_process and report_to:
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracked)

    global_step, first_epoch, skip_batches = resume_state(accelerator, args, output_dir, updates_per_epoch)

    pairs = validation_pairs(args)
    result = TrainResult(None, output_dir, global_step, False, 0.0, sum(p.numel() for p in params))

    def validate(step: int) -> None:
        if not (accelerator.is_main_process and pairs):
            return
        encoder.eval()
        pipe = sampling_pipeline(args, tokenizer, text_encoder, vae, unet, EtherControlPipeline)
        with torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            images = sample_controls(pipe, pairs, args, accelerator.device)
        folder = output_dir / "validation"
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{step:06d}.png"
        make_grid(images, 1 + args.num_validation_images).save(path)
        result.validation_images.append(path)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_images(
                    "validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC"
                )
        callbacks.call("on_validation", step, images, [path])
        encoder.train()

    def validation_due(step: int) -> bool:
        return bool(pairs and args.validation_steps and step % args.validation_steps == 0)

    callbacks.call("on_start", max_train_steps, global_step)
    if global_step == 0 and validation_due(0):
        validate(0)
    progress = tqdm(
        range(max_train_steps),
        initial=global_step,
        desc="steps",
        disable=args.quiet or not accelerator.is_local_main_process,
    )
    start = time.time()
    encoder_run.train()
    stop = False
    for epoch in range(first_epoch, num_epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        if hasattr(epoch_loader, "set_epoch"):
            epoch_loader.set_epoch(epoch)
        skip_batches = 0
        for batch in epoch_loader:
            with accelerator.accumulate(*prepared[: len(trained)]):
                pixels = batch["pixel_values"].to(accelerator.device, dtype=vae.dtype)
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample(generator=noise_generator)
                    hidden = text_encoder(batch["input_ids"].to(accelerator.device))[0]
                latents = (latents * vae.config.scaling_factor).to(weight_dtype)
                noise = sample_noise(latents, noise_generator)
                timesteps = torch.randint(
                    0,
                    noise_scheduler.config.num_train_timesteps,
                    (latents.shape[0],),
                    generator=noise_generator,
                    device=latents.device,
                )
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                set_condition(unet, encoder_run(batch["conditioning_pixel_values"].to(accelerator.device)))
                prediction = unet_run(noisy, timesteps, hidden).sample
                set_condition(unet, None)
                target = prediction_target(noise_scheduler, latents, noise, timesteps)
                loss, parts = dreambooth_loss(prediction, target, timesteps, noise_scheduler, args.snr_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            logs = {
                "loss": float(loss.detach()),
                "lr": lr_scheduler.get_last_lr()[-1],
                "encoder_lr": lr_scheduler.get_last_lr()[0],
            }
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            result.losses.append(logs["loss"])
            accelerator.log(logs, step=global_step)
            callbacks.call("on_step", global_step, logs)
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if validation_due(global_step):
                validate(global_step)
            if callbacks.call("should_stop"):
                stop = result.stopped_early = True
                if global_step % args.checkpointing_steps:
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if stop or global_step >= max_train_steps:
                break
        if stop or global_step >= max_train_steps:
            break
    progress.close()
    result.train_seconds = time.time() - start
    result.global_step = global_step
    accelerator.wait_for_everyone()
    check_replicas_agree(accelerator, params)
    if accelerator.is_main_process:
        extra = {
            "steps": str(global_step),
            "learning_rate": str(args.learning_rate),
            "encoder_learning_rate": str(args.encoder_learning_rate),
            "trained_with": "ether-diffusion control",
            "num_processes": str(accelerator.num_processes),
        }
        result.adapter_path = save_control_weights(
            output_dir / CONTROL_WEIGHT_NAME,
            unet,
            encoder,
            args.adapter_name,
            args.pretrained_model_name_or_path,
            extra,
        )
        if pairs:  # the round trip: the saved file into a fresh pipeline, then samples
            _, fresh_text_encoder, fresh_vae, fresh_unet, _ = load_components(args)
            pipe = sampling_pipeline(
                args, tokenizer, fresh_text_encoder, fresh_vae, fresh_unet, EtherControlPipeline
            ).to(accelerator.device)
            pipe.load_control_weights(result.adapter_path)
            images = sample_controls(pipe, pairs, args, accelerator.device)
            make_grid(images, 1 + args.num_validation_images).save(output_dir / "samples.png")
            callbacks.call("on_validation", global_step, images, [output_dir / "samples.png"])
    if accelerator.num_processes > 1:
        del prepared, encoder_run, unet_run, save_hook, load_hook, validate
        release_wrappers(accelerator)
    accelerator.end_training()
    return result
