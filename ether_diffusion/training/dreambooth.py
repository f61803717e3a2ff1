"""DreamBooth with ETHER adapters: the flags of diffusers' ``train_dreambooth_lora.py`` and the training loop.

Used by ``scripts/train_dreambooth_ether.py``, ``ether-diffusion train``, the demo and the studio, so they cannot
drift apart. Run under ``accelerate launch`` (data parallel, mixed precision) or plain ``python``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..config import SIDES, TARGET_PRESETS, EtherConfig
from ..inject import adapter_parameters, enable_adapters, inject, load_adapter_state_dict
from ..io import DEFAULT_WEIGHT_NAME, atomic_write, read_adapter_file, save_adapter
from .checkpoints import checkpoint_step, latest_checkpoint, save_checkpoint
from .class_images import ensure_class_images
from .data import DreamBoothDataset, EpochShuffleSampler, collate, load_image_folder
from .diffusion import dreambooth_loss, prediction_target, sample_noise

__all__ = ["TrainCallbacks", "TrainResult", "build_parser", "parse_args", "train", "validate_args"]

PAPER_LEARNING_RATE = 6e-3  # ETHER / ETHER+ DreamBooth (Bini et al. 2024, Tab. 2 setup)


def default_model() -> str:
    from ..world.assets import default_model_path

    return str(default_model_path())


def add_model_arguments(a) -> None:
    a(
        "--pretrained_model_name_or_path",
        default=None,
        help="diffusers model folder or hub id (default: the shipped tiny model, assets/tiny-sd)",
    )
    a("--revision", default=None)
    a("--variant", default=None, help="weights variant, e.g. fp16")
    a("--tokenizer_name", default=None)


def add_ether_arguments(a, target_modules: str) -> None:
    a("--ether_method", choices=["ether", "ether_plus"], default="ether_plus")
    a("--n_blocks", type=int, default=1)
    a(
        "--ether_sides",
        choices=["auto", "input", "output", "both"],
        default="auto",
        help="auto: input for ETHER, both (two-sided) for ETHER+",
    )
    a(
        "--target_modules",
        default=target_modules,
        help=f"a preset ({', '.join(p for p in TARGET_PRESETS if p.startswith('unet'))}) or comma-separated suffixes",
    )


def add_loop_arguments(a, learning_rate: float, train_batch_size: int) -> None:
    """The optimisation, checkpoint, precision and logging flags both training loops share (diffusers' names)."""
    a("--seed", type=int, default=0)
    a("--train_batch_size", type=int, default=train_batch_size)
    a("--num_train_epochs", type=int, default=1)
    a("--max_train_steps", type=int, default=None, help="overrides --num_train_epochs")
    a("--checkpointing_steps", type=int, default=500)
    a("--checkpoints_total_limit", type=int, default=None)
    a("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true")
    a("--learning_rate", type=float, default=learning_rate)
    a("--scale_lr", action="store_true", help="multiply lr by accumulation steps × batch size × processes")
    a(
        "--lr_scheduler",
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    a("--lr_warmup_steps", type=int, default=0)
    a("--lr_num_cycles", type=int, default=1)
    a("--lr_power", type=float, default=1.0)
    a("--use_8bit_adam", action="store_true")
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=0.0, help="0 by default: decay would shrink û, v̂ for nothing")
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--snr_gamma", type=float, default=None, help="min-SNR weighting gamma (5.0 is the usual choice)")
    a(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="default: accelerate's configuration, else no",
    )
    a("--allow_tf32", action="store_true")
    a("--report_to", default="tensorboard", help="tensorboard, wandb, all or none")
    a("--logging_dir", default="logs")
    a("--local_rank", type=int, default=-1)
    a("--quiet", action="store_true", help="no progress bars")


def check_loop_args(args: argparse.Namespace, fail) -> None:
    """Checks of the shared loop flags; ``fail(message)`` reports one."""
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1")
    for name in ("max_train_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name} must be at least 1")
    if args.n_blocks < 1:
        fail("--n_blocks must be at least 1")
    if args.learning_rate <= 0:
        fail("--learning_rate must be positive")
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        fail("--mixed_precision fp16 needs a CUDA GPU; on this machine use --mixed_precision bf16 or no")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            fail(
                "--use_8bit_adam needs bitsandbytes (pip install bitsandbytes, on a CUDA machine); "
                "or drop the flag to use torch's AdamW"
            )
    if args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = default_model()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DreamBooth with ETHER adapters (flags as diffusers' train_dreambooth_lora)"
    )
    a = p.add_argument
    add_model_arguments(a)
    # data
    a("--instance_data_dir", required=True, help="folder with 3-10 images of the subject")
    a("--instance_prompt", required=True, help="prompt with the identifier, e.g. 'a sks dog'")
    a("--class_data_dir", default=None, help="class images (default <output_dir>/class_images)")
    a("--class_prompt", default=None, help="prompt for the class, e.g. 'a dog'")
    a("--with_prior_preservation", action="store_true")
    a("--prior_loss_weight", type=float, default=1.0)
    a("--num_class_images", type=int, default=100, help="class images wanted; missing ones are generated")
    a("--sample_batch_size", type=int, default=4, help="batch size for class-image generation")
    a("--prior_generation_precision", choices=["no", "fp32", "fp16", "bf16"], default=None)
    a("--resolution", type=int, default=None, help="default: the model's native size (64 for tiny-sd, 512 for SD)")
    a("--center_crop", action="store_true")
    a("--random_flip", action="store_true")
    a("--dataloader_num_workers", type=int, default=0)
    # validation
    a("--validation_prompt", default=None)
    a("--num_validation_images", type=int, default=4)
    a("--validation_epochs", type=int, default=None, help="validate every N epochs")
    a("--validation_steps", type=int, default=None, help="validate every N steps (and at step 0: the base model)")
    a("--validation_inference_steps", type=int, default=25)
    a("--validation_guidance_scale", type=float, default=7.5)
    # ETHER
    add_ether_arguments(a, "unet-attention")
    a("--train_text_encoder", action="store_true", help="also adapt the text encoder's attention")
    a("--adapter_name", default="default")
    # optimisation
    a("--output_dir", default="ether-dreambooth")
    add_loop_arguments(a, PAPER_LEARNING_RATE, train_batch_size=1)
    a("--offset_noise", action="store_true", help="add per-channel offset noise (0.1), as diffusers does")
    a("--no_final_reload", action="store_true", help="skip reloading the saved file into a fresh pipeline")
    return p


def validate_args(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Check flags that contradict each other; messages say what to do."""

    def fail(message: str):
        if parser is not None:
            parser.error(message)
        raise ValueError(message)

    if args.with_prior_preservation and not args.class_prompt:
        fail(
            "--with_prior_preservation needs --class_prompt (e.g. 'a dog'): the prior is the class without the "
            "identifier"
        )
    if args.class_prompt and not args.with_prior_preservation and args.class_data_dir:
        print("note: --class_prompt/--class_data_dir are ignored without --with_prior_preservation")
    check_loop_args(args, fail)
    for name in ("num_validation_images", "sample_batch_size"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1")
    for name in ("validation_steps", "validation_epochs", "num_class_images"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "num_class_images" else 1):
            fail(f"--{name} must be at least 1")
    if args.validation_prompt is None and (args.validation_steps or args.validation_epochs):
        fail("--validation_steps/--validation_epochs need --validation_prompt")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        fail("--resolution must be a positive multiple of 8")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    return validate_args(parser.parse_args(argv), parser)


def unet_ether_config(args) -> EtherConfig:
    """The UNet's adapter config from the ETHER flags (``add_ether_arguments``)."""
    sides = {"auto": None, "input": ("input",), "output": ("output",), "both": SIDES}[args.ether_sides]
    targets = (
        args.target_modules
        if args.target_modules in TARGET_PRESETS
        else [t.strip() for t in args.target_modules.split(",") if t.strip()]
    )
    return EtherConfig(
        target_modules=targets, method=args.ether_method, n_blocks=args.n_blocks, sides=sides, init_seed=args.seed
    )


def ether_configs(args) -> dict[str, EtherConfig]:
    configs = {"unet": unet_ether_config(args)}
    if args.train_text_encoder:
        configs["text_encoder"] = dataclasses.replace(configs["unet"], target_modules="text-encoder-attention")
    return configs


# --- callbacks, so the studio can watch and stop a run ---------------------------------------------------------


@dataclass
class TrainCallbacks:
    """Hooks into the loop. Subclass or pass functions; all are optional."""

    on_start: object = None  # fn(total_steps, start_step)
    on_step: object = None  # fn(step, logs: dict)
    on_validation: object = None  # fn(step, images: list[PIL.Image], paths: list[Path])
    should_stop: object = None  # fn() -> bool: stop after this step, keeping the adapter and a checkpoint

    def call(self, name, *args):
        fn = getattr(self, name)
        return fn(*args) if fn is not None else None


@dataclass
class TrainResult:
    adapter_path: Path | None
    output_dir: Path
    global_step: int
    stopped_early: bool
    train_seconds: float
    trainable_parameters: int
    losses: list[float] = field(default_factory=list)
    validation_images: list[Path] = field(default_factory=list)


# --- the loop ------------------------------------------------------------------------------------------------


class ModelLoadError(RuntimeError):
    pass


def load_components(args):
    """Tokenizer, text encoder, VAE, UNet and noise scheduler of the base model, with a clear error if absent."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = args.pretrained_model_name_or_path
    local = Path(path)
    if (local.exists() or path.startswith((".", "/", "~"))) and not (local / "model_index.json").is_file():
        raise ModelLoadError(
            f"'{path}' is not a diffusers model folder (no model_index.json); pass a folder saved "
            "with save_pretrained, a hub id, or leave the flag out to use the shipped tiny model"
        )
    kwargs = dict(revision=args.revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(
            args.tokenizer_name or path, subfolder=None if args.tokenizer_name else "tokenizer", **kwargs
        )
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=args.variant, **kwargs)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **kwargs)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=args.variant, **kwargs)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load the base model '{path}': {err}. Without internet access pass a local "
            "diffusers folder (hub downloads need a connection)"
        ) from err
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def _check_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"cannot write to --output_dir '{output_dir}' ({err.strerror or err}); choose a folder you can write to"
        ) from err


class _GeneratorState:
    """The training noise generator, saved and restored with each checkpoint."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self):
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["state"])


def make_grid(images, columns: int | None = None):
    from PIL import Image

    columns = columns or len(images)
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def sampling_pipeline(args, tokenizer, text_encoder, vae, unet, pipeline_class=None):
    """A pipeline (``StableDiffusionPipeline`` unless ``pipeline_class``) over the training components."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scheduler = DPMSolverMultistepScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    pipe = (pipeline_class or StableDiffusionPipeline)(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_validation(pipe, args, device) -> list:
    generators = [torch.Generator(device="cpu").manual_seed(args.seed + i) for i in range(args.num_validation_images)]
    with torch.no_grad():
        return pipe(
            [args.validation_prompt] * args.num_validation_images,
            generator=generators,
            num_inference_steps=args.validation_inference_steps,
            guidance_scale=args.validation_guidance_scale,
        ).images


def write_model_card(output_dir: Path, args, result: TrainResult, grid_name: str | None, parameters: int) -> None:
    configs = {c: cfg.to_dict() for c, cfg in ether_configs(args).items()}
    lines = [
        "---",
        f"base_model: {args.pretrained_model_name_or_path}",
        "library_name: ether-diffusion",
        "tags: [ether, dreambooth, diffusers, text-to-image]",
        f"instance_prompt: {args.instance_prompt}",
        "---",
        "",
        f"# ETHER DreamBooth adapter: `{args.instance_prompt}`",
        "",
        f"An {args.ether_method.replace('_', '+').upper().replace('ETHER+PLUS', 'ETHER+')} adapter "
        f"({parameters:,} trainable parameters) for `{args.pretrained_model_name_or_path}`, trained with "
        f"ether-diffusion {__version__} for {result.global_step} steps in {result.train_seconds:.0f} s.",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "from ether_diffusion import load_ether_weights",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{args.pretrained_model_name_or_path}")',
        f'load_ether_weights(pipe, "{output_dir}")',
        f'image = pipe("{args.validation_prompt or args.instance_prompt}").images[0]',
        "```",
        "",
        "## Settings",
        "",
        f"- instance prompt: `{args.instance_prompt}`; prior preservation: "
        + (
            f"yes, `{args.class_prompt}`, {args.num_class_images} images, weight {args.prior_loss_weight}"
            if args.with_prior_preservation
            else "no"
        ),
        f"- learning rate {args.learning_rate} ({args.lr_scheduler}), batch {args.train_batch_size} × "
        f"{args.gradient_accumulation_steps} accumulation, resolution {args.resolution}, seed {args.seed}",
        f"- snr_gamma {args.snr_gamma}, offset noise {args.offset_noise}, mixed precision {args.mixed_precision}",
        f"- adapter config: `{json.dumps(configs)}`",
    ]
    if grid_name:
        lines += [
            "",
            f"## Samples: `{args.validation_prompt}`",
            "",
            "From the saved file reloaded into a fresh pipeline:",
            "",
            f"![samples]({grid_name})",
        ]
    with atomic_write(output_dir / "README.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def resume_state(accelerator, args, output_dir: Path, updates_per_epoch: int) -> tuple[int, int, int]:
    """Load ``--resume_from_checkpoint`` (a folder or "latest") into ``accelerator``'s registered state; returns
    ``(global_step, first_epoch, batches to skip in that epoch)``, zeros for a new run."""
    if not args.resume_from_checkpoint:
        return 0, 0, 0
    latest = args.resume_from_checkpoint == "latest"
    path = latest_checkpoint(output_dir) if latest else Path(args.resume_from_checkpoint)
    if path is None:
        accelerator.print(f"no checkpoint in '{output_dir}' to resume from: starting a new run")
        return 0, 0, 0
    if not path.is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint '{path}' does not exist; pass a checkpoint-N folder or 'latest'"
        )
    accelerator.print(f"resuming from {path}")
    accelerator.load_state(str(path))
    step = checkpoint_step(path)
    skip = (step % updates_per_epoch) * args.gradient_accumulation_steps
    return step, step // updates_per_epoch, skip


def check_replicas_agree(accelerator, params) -> None:
    """Data parallel: raise unless every process ends with the same trained parameters."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    sums = accelerator.gather(checksum.to(accelerator.device))
    if not torch.allclose(sums, sums[:1].expand_as(sums)):
        raise RuntimeError(f"data-parallel replicas hold different weights (checksums {sums.tolist()})")


def release_wrappers(accelerator) -> None:
    """Free the DDP wrappers on every rank together, before the process group goes: gloo can hang forever in a
    process group's destructor (run when a DDP reducer is freed) once a peer has torn its side down. The caller
    drops its own references to the prepared models first."""
    accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()


def train(args: argparse.Namespace, callbacks: TrainCallbacks | None = None) -> TrainResult:  # noqa: C901
    """Run DreamBooth with ETHER as configured by ``args`` (see ``build_parser``)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    callbacks = callbacks or TrainCallbacks()
    output_dir = Path(args.output_dir)
    _check_output_dir(output_dir)
    instance_images = load_image_folder(args.instance_data_dir, "instance")  # fail before any model loads

    report_to = None if args.report_to in (None, "none") else args.report_to
    has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available()
    accelerator = Accelerator(
        cpu=not has_accelerator,  # lets `accelerate launch --multi_gpu` / torchrun run data parallel on CPUs (gloo)
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
    if args.resolution is None:
        args.resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
    vae.to(accelerator.device, dtype=torch.float32 if weight_dtype == torch.float16 else weight_dtype)
    configs = ether_configs(args)
    inject(unet, configs["unet"], args.adapter_name)
    if "text_encoder" in configs:
        inject(text_encoder, configs["text_encoder"], args.adapter_name)
    unet.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    trainable = [m for m in (unet, text_encoder) if adapter_parameters(m, args.adapter_name)]
    params = [p for m in trainable for p in adapter_parameters(m, args.adapter_name)]
    for p in params:  # the frozen model may run in half precision; the vectors train in fp32
        p.data = p.data.float()
        p.requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if "text_encoder" in configs:
            text_encoder.gradient_checkpointing_enable()

    # class images for prior preservation (generated by the base model, before any training)
    class_images = None
    if args.with_prior_preservation:
        class_dir = Path(args.class_data_dir or output_dir / "class_images")
        if accelerator.is_main_process:

            def make_pipeline():
                for model in trainable:  # the prior comes from the base model, not the fresh adapter
                    enable_adapters(model, False)
                return sampling_pipeline(args, tokenizer, text_encoder, vae, unet)

            try:
                ensure_class_images(
                    make_pipeline,
                    args.class_prompt,
                    class_dir,
                    args.num_class_images,
                    args.sample_batch_size,
                    args.seed,
                    args.validation_inference_steps,
                    args.validation_guidance_scale,
                    show_progress=not args.quiet,
                )
            finally:
                for model in trainable:
                    enable_adapters(model, True)
        accelerator.wait_for_everyone()
        class_images = load_image_folder(class_dir, "class")[: max(args.num_class_images, 1)]

    dataset = DreamBoothDataset(
        instance_images,
        args.instance_prompt,
        tokenizer,
        args.resolution,
        args.center_crop,
        args.random_flip,
        class_images,
        args.class_prompt,
        seed=args.seed,
    )
    sampler = EpochShuffleSampler(len(dataset), seed=args.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(
        params,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    batches_per_epoch = math.ceil(len(dataset) / args.train_batch_size / accelerator.num_processes)
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
    prepared = accelerator.prepare(*trainable, optimizer, loader, lr_scheduler)
    models = list(prepared[: len(trainable)])
    optimizer, loader, lr_scheduler = prepared[len(trainable) :]
    unet_train = models[0]
    text_encoder_run = models[1] if len(models) > 1 else text_encoder
    component_of = {id(unet): "unet", id(text_encoder): "text_encoder"}

    # checkpoints hold the adapter file (not the 860M frozen weights), optimizer, scheduler, RNG and step
    def save_hook(hook_models, weights, folder):
        if accelerator.is_main_process:
            parts = {component_of[id(accelerator.unwrap_model(m))]: accelerator.unwrap_model(m) for m in hook_models}
            save_adapter(
                Path(folder) / DEFAULT_WEIGHT_NAME,
                parts,
                args.adapter_name,
                base_model=args.pretrained_model_name_or_path,
            )
        weights.clear()

    def load_hook(hook_models, folder):
        source = read_adapter_file(Path(folder) / DEFAULT_WEIGHT_NAME)
        while hook_models:
            model = accelerator.unwrap_model(hook_models.pop())
            load_adapter_state_dict(model, args.adapter_name, source.component_state(component_of[id(model)]))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    noise_generator = torch.Generator(device=accelerator.device).manual_seed(args.seed + accelerator.process_index)
    generator_state = _GeneratorState(noise_generator)
    accelerator.register_for_checkpointing(generator_state)

    if accelerator.is_main_process and report_to:
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("ether-dreambooth", config=tracked)

    global_step, first_epoch, skip_batches = resume_state(accelerator, args, output_dir, updates_per_epoch)

    def validation_due(step: int) -> bool:
        return bool(args.validation_prompt and args.validation_steps and step % args.validation_steps == 0)

    result = TrainResult(None, output_dir, global_step, False, 0.0, sum(p.numel() for p in params))

    def validate(step: int) -> None:
        if not accelerator.is_main_process:
            return
        unet.eval()
        pipe = sampling_pipeline(
            args, tokenizer, accelerator.unwrap_model(text_encoder_run), vae, accelerator.unwrap_model(unet_train)
        )
        baseline = step == 0  # the base model, what training is judged against (a fresh ETHER reflection is not I)
        for model in trainable if baseline else ():
            enable_adapters(model, False)
        try:
            with torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
                images = generate_validation(pipe, args, accelerator.device)
        finally:
            for model in trainable if baseline else ():
                enable_adapters(model, True)
        folder = output_dir / "validation"
        folder.mkdir(exist_ok=True)
        paths = []
        for i, image in enumerate(images):
            paths.append(folder / f"step-{step:06d}_{i}.png")
            image.save(paths[-1])
        result.validation_images.extend(paths)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_images(
                    "validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC"
                )
        callbacks.call("on_validation", step, images, paths)
        unet.train()

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
    unet_train.train()
    stop = False
    for epoch in range(first_epoch, num_epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        if hasattr(epoch_loader, "set_epoch"):  # accelerate re-sets the sampler's epoch from its own counter
            epoch_loader.set_epoch(epoch)
        skip_batches = 0
        for batch in epoch_loader:
            with accelerator.accumulate(*models):
                pixels = batch["pixel_values"].to(accelerator.device, dtype=vae.dtype)
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample(generator=noise_generator)
                latents = (latents * vae.config.scaling_factor).to(weight_dtype)
                noise = sample_noise(latents, noise_generator, 0.1 if args.offset_noise else 0.0)
                timesteps = torch.randint(
                    0,
                    noise_scheduler.config.num_train_timesteps,
                    (latents.shape[0],),
                    generator=noise_generator,
                    device=latents.device,
                )
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder_run(batch["input_ids"].to(accelerator.device))[0]
                prediction = unet_train(noisy, timesteps, hidden).sample
                target = prediction_target(noise_scheduler, latents, noise, timesteps)
                loss, parts = dreambooth_loss(
                    prediction,
                    target,
                    timesteps,
                    noise_scheduler,
                    args.snr_gamma,
                    args.with_prior_preservation,
                    args.prior_loss_weight,
                )
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
            logs = {k: float(v) for k, v in parts.items()}
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            result.losses.append(logs["loss"])
            accelerator.log(logs, step=global_step)
            callbacks.call("on_step", global_step, logs)
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if validation_due(global_step) or (
                args.validation_epochs
                and args.validation_prompt
                and global_step % (updates_per_epoch * args.validation_epochs) == 0
            ):
                validate(global_step)
            if callbacks.call("should_stop"):
                stop = result.stopped_early = True
                if global_step % args.checkpointing_steps:  # a checkpoint to resume from, unless one was just saved
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
        parts = {
            c: accelerator.unwrap_model(m)
            for c, m in (("unet", unet_train), ("text_encoder", text_encoder_run))
            if c in configs
        }
        extra = {
            "instance_prompt": args.instance_prompt,
            "steps": str(global_step),
            "learning_rate": str(args.learning_rate),
            "trained_with": "ether-diffusion dreambooth",
            "num_processes": str(accelerator.num_processes),
        }
        result.adapter_path = save_adapter(
            output_dir / DEFAULT_WEIGHT_NAME,
            parts,
            args.adapter_name,
            base_model=args.pretrained_model_name_or_path,
            extra=extra,
        )
        grid_name = None
        if args.validation_prompt and not args.no_final_reload:
            images = reload_and_sample(args, result.adapter_path, accelerator.device)
            grid_name = "samples.png"
            make_grid(images).save(output_dir / grid_name)
            callbacks.call("on_validation", global_step, images, [output_dir / grid_name])
        write_model_card(output_dir, args, result, grid_name, result.trainable_parameters)
    if accelerator.num_processes > 1:
        del prepared, models, unet_train, text_encoder_run, validate, save_hook, load_hook
        release_wrappers(accelerator)
    accelerator.end_training()
    return result


def reload_and_sample(args, adapter_path: Path, device) -> list:
    """The round trip diffusers does after training: a fresh pipeline from disk, the saved file, samples."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from ..pipeline import load_ether_weights

    pipe = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    load_ether_weights(pipe, adapter_path)
    return generate_validation(pipe, args, device)
