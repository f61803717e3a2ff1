"""Typed run configurations: one dataclass per task, built by argparse for the scripts and the CLI, directly by the
studio, the demos and the benchmarks.

Every field is a flag of the same name (diffusers' names), documented once, in its ``option(...)``; the parser is
derived from the fields, so a flag cannot exist without its field or the other way round. ``validate()`` checks
what the types cannot (ranges, finite numbers, flags that contradict each other) and raises ``ConfigError`` whose
message says what to do; the command line turns it into a usage error, the studio into a message on the page.

    config = DreamBoothConfig(instance_data_dir="dog/", instance_prompt="a sks dog", max_train_steps=400)
    config.validate()
    config = DreamBoothConfig.from_args(["--instance_data_dir", "dog/", "--instance_prompt", "a sks dog"])
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import MISSING, dataclass
from enum import Enum
from typing import Any, ClassVar

import torch

from ..config import SIDES, TARGET_PRESETS, EtherConfig, check_adapter_name
from ..images import MAX_IMAGE_SIDE
from ..models import default_model
from ..quantize import QUANTIZATIONS, check_quantization
from ..reflection import METHODS
from .text import check_prompt

__all__ = ["ConfigError", "ForeignFlag", "RunConfig", "TaskKind", "option", "target_names"]

ETHER_METHODS = tuple(METHODS)  # reflection.METHODS: one entry per adapter method
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
OPTIMIZERS = ("adamw", "prodigy")  # given in any case, as diffusers' scripts take them ("AdamW", "prodigy")
VALIDATION_SCHEDULERS = ("DPMSolverMultistepScheduler", "DDPMScheduler")
#: the range of every number flag without a ``maximum`` of its own. Float flags are rates, weights, scales and
#: coefficients of order one; beyond a million none means anything, and values near float32's largest (3.4e38) make
#: torch overflow (AdamW divides the learning rate by 1 - beta1 and keeps it in a float32). Int flags are steps,
#: counts and sizes: 2**31 - 1 is more than any run takes, and far from the 64-bit limit where the index types of
#: torch, numpy and Python overflow
MAX_FLOAT_FLAG = 1e6
MAX_INT_FLAG = 2**31 - 1
#: the largest seed numpy's and torch's seeding (``accelerate.utils.set_seed``) accept
MAX_SEED = 2**32 - 1
_WHY = {
    float: " (rates, weights and scales beyond it mean nothing, and overflow torch's float32 arithmetic)",
    int: " (steps, counts and sizes beyond it mean nothing, and overflow the index types of torch and numpy)",
}


class TaskKind(str, Enum):
    """The kinds of training: each has its configuration and task (``registry.py`` maps them per model family)."""

    DREAMBOOTH = "dreambooth"  # a subject from a few images (training/dreambooth.py)
    CONTROL = "control"  # a condition encoder plus adapters (control/train.py)

    def __str__(self) -> str:
        return self.value

    __hash__ = str.__hash__  # equal to its value, and found by it in dicts and sets (JSON records hold the value)


def target_names(value) -> tuple[str, ...]:
    """``--target_modules`` as a configuration holds it: the preset names and module-path suffixes, in order, with
    comma-separated text split (``"to_q,to_k"`` or ``["to_q", "to_k"]`` → ``("to_q", "to_k")``)."""
    items = [value] if isinstance(value, str) else list(value or ())
    return tuple(name.strip() for item in items for name in str(item).split(",") if name.strip())


class ConfigError(ValueError):
    """A run configuration that cannot run; the message names the flag and what to do."""


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    same_run: bool = True,
    cli: bool = True,
    factory=None,
    flag: str | None = None,
    secret: bool = False,
):
    """A config field and its flag.

    ``minimum``, ``maximum``: the smallest and largest allowed values (checked by ``validate``; without a maximum, a
    number flag has ``MAX_INT_FLAG`` or ``MAX_FLOAT_FLAG``). ``same_run=False``: a field a resumed run may
    change (output, logging, validation, length) without becoming a different run; every other field is part of
    the run's identity recorded in its checkpoints. ``cli=False``: library-only (benchmarks), no flag. ``flag``: the
    flag's name when it is not the field's (``--config`` for ``model_config``). ``secret``: never written anywhere
    (checkpoints, trackers, model cards): a token.

    A ``bool`` field defaulting to False is a switch (``--flag``); one defaulting to True takes a value
    (``--flag false``), as diffusers' ``--prodigy_decouple`` does.
    """
    metadata = dict(help=help, choices=choices, minimum=minimum, maximum=maximum, same_run=same_run, cli=cli, flag=flag,
                    secret=secret)  # fmt: skip
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ForeignFlag:
    """A flag of diffusers' training scripts that has no field here: ``accepted`` (what it asks for is always so, and
    ``reason`` says why) or refused with ``reason`` (why it does not apply to ETHER, and what to use instead)."""

    reason: str
    takes_value: bool = False
    accepted: bool = False


#: flags of diffusers' scripts every task answers without a field (``DreamBoothConfig`` adds its own)
FOREIGN_FLAGS = {
    "rank": ForeignFlag(
        "ETHER has no rank: each adapted layer learns one unit vector per diagonal block (two per side for ETHER+), a "
        "transform of fixed strength. Its knobs are --n_blocks (more, smaller blocks), --ether_method (ether_plus "
        "relaxes the reflection), --ether_sides and --target_modules (which layers adapt); drop --rank",
        takes_value=True,
    ),
    "lora_dropout": ForeignFlag(
        "ETHER has no low-rank update to drop out: its transforms stay within a fixed distance of the identity by "
        "construction, which is why it needs no dropout. Drop the flag (DreamBooth's regulariser is "
        "--with_prior_preservation)",
        takes_value=True,
    ),
    "set_grads_to_none": ForeignFlag(
        "the loop always frees the gradients (sets them to None) after every optimizer step", accepted=True
    ),
}


@dataclass(kw_only=True)
class RunConfig:
    """What every training task shares: the base model, the adapter, the optimisation loop, validation, output."""

    task_name: ClassVar[str] = "run"
    description: ClassVar[str] = ""
    #: the kind of training and the model family this configuration's flags are for (``registry.py``)
    kind: ClassVar[TaskKind]
    family: ClassVar[str] = "sd"
    #: flags of diffusers' scripts answered without a field: accepted as always so, or refused with the reason
    foreign_flags: ClassVar[dict[str, ForeignFlag]] = FOREIGN_FLAGS

    # --- the base model ------------------------------------------------------------------------------------------
    pretrained_model_name_or_path: str | None = option(
        None,
        "diffusers model folder, hub id, or one .safetensors/.ckpt checkpoint (default: the shipped tiny model)",
    )
    model_config: str | None = option(
        None,
        "for a single-file model: a local diffusers folder of the same architecture (configs and tokenizer, no "
        "weights), so nothing is fetched from the Hub",
        flag="config",
    )
    original_config: str | None = option(None, "for a single-file model: its original LDM .yaml")
    revision: str | None = option(None, "model revision (hub)")
    variant: str | None = option(None, "weights variant, e.g. fp16")
    tokenizer_name: str | None = option(None, "tokenizer folder or hub id, if not the model's own")

    # --- the adapter ---------------------------------------------------------------------------------------------
    ether_method: str = option("ether_plus", "ETHER (one reflection per block) or ETHER+", choices=ETHER_METHODS)
    n_blocks: int = option(1, "diagonal blocks per transform (must divide every adapted width)", minimum=1)
    ether_sides: str = option(
        "auto", "auto: input for ETHER, both (two-sided) for ETHER+", choices=("auto", "input", "output", "both")
    )
    target_modules: tuple[str, ...] = option(
        ("unet-attention",),
        f"presets ({', '.join(p for p in TARGET_PRESETS if p.startswith('unet'))}) and/or module-path suffixes, "
        "comma- or space-separated",
    )
    adapter_name: str = option("default", "name stored in the adapter file")

    # --- the loop ------------------------------------------------------------------------------------------------
    output_dir: str = option("ether-output", "where checkpoints, validation images and the adapter go", same_run=False)
    seed: int = option(0, "seed of the data order, noise, augmentation and initial vectors", minimum=0,
                       maximum=MAX_SEED)  # fmt: skip
    resolution: int | None = option(None, "training resolution in pixels (default: the model's native size)", minimum=8,
                                    maximum=MAX_IMAGE_SIDE)  # fmt: skip
    train_batch_size: int = option(1, "batch size per process", minimum=1)
    num_train_epochs: int = option(1, "epochs (ignored when --max_train_steps is given)", minimum=1, same_run=False)
    max_train_steps: int | None = option(None, "optimisation steps; overrides --num_train_epochs", minimum=1,
                                         same_run=False)  # fmt: skip
    checkpointing_steps: int = option(500, "save a checkpoint every N steps", minimum=1, same_run=False)
    checkpoints_total_limit: int | None = option(None, "keep at most N checkpoints", minimum=1, same_run=False)
    resume_from_checkpoint: str | None = option(None, "a checkpoint folder, or 'latest'", same_run=False)
    gradient_accumulation_steps: int = option(1, "batches per optimisation step", minimum=1)
    gradient_checkpointing: bool = option(False, "trade compute for memory in the UNet (and text encoder)")
    learning_rate: float = option(6e-3, "learning rate of the adapter vectors", minimum=0.0)
    scale_lr: bool = option(False, "multiply the learning rate by accumulation steps × batch size × processes")
    lr_scheduler: str = option("constant", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(0, "warm-up steps", minimum=0)
    lr_num_cycles: int = option(1, "cycles of cosine_with_restarts", minimum=1)
    lr_power: float = option(1.0, "power of the polynomial schedule")
    optimizer: str = option(
        "adamw",
        "adamw (torch's; bitsandbytes' with --use_8bit_adam) or prodigy (the prodigyopt package; it finds "
        "its own step size: give --learning_rate 1.0)",
    )
    use_8bit_adam: bool = option(False, "bitsandbytes' 8-bit AdamW (CUDA only)")
    adam_beta1: float = option(0.9, "AdamW beta1", minimum=0.0)
    adam_beta2: float = option(0.999, "AdamW beta2", minimum=0.0)
    adam_weight_decay: float = option(0.0, "0 by default: decay would shrink û, v̂ for nothing", minimum=0.0)
    adam_epsilon: float = option(1e-8, "AdamW epsilon", minimum=0.0)
    prodigy_beta3: float | None = option(
        None, "Prodigy's coefficient for its step-size estimate (default: the square root of --adam_beta2)",
        minimum=0.0,
    )  # fmt: skip
    prodigy_decouple: bool = option(True, "Prodigy: AdamW-style decoupled weight decay (true/false)")
    prodigy_use_bias_correction: bool = option(True, "Prodigy: Adam's bias correction (true/false)")
    prodigy_safeguard_warmup: bool = option(True, "Prodigy: no step-size growth while warming up (true/false)")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: no clipping)", minimum=0.0)
    snr_gamma: float | None = option(None, "min-SNR weighting gamma (5.0 is the usual choice)", minimum=0.0)
    mixed_precision: str | None = option(
        None, "default: accelerate's configuration, else no", choices=("no", "fp16", "bf16")
    )
    allow_tf32: bool = option(False, "TF32 matmuls on Ampere GPUs")
    enable_xformers_memory_efficient_attention: bool = option(
        False, "xformers' attention kernels in the UNet (needs xformers; torch's own scaled-dot-product attention is "
        "used otherwise, which is as memory-efficient on torch 2)", same_run=False,
    )  # fmt: skip
    compile: bool = option(False, "torch.compile the trained models (the first steps are slower while it compiles)")
    dynamo_backend: str = option(
        "inductor", "torch.compile backend with --compile", choices=("inductor", "aot_eager", "eager", "cudagraphs")
    )
    compile_scope: str = option(
        "blocks",
        "with --compile: 'blocks' compiles each repeated block of the UNet/transformer (diffusers' regional "
        "compilation: one graph per block shape, compiles in a fraction of the time), 'model' the whole model",
        choices=("blocks", "model"),
    )
    base_quantization: str = option(
        "none",
        "hold the frozen base model's Linear weights in fewer bits under the adapters (torchao): int8 halves bf16, "
        "nf4 quarters it (QLoRA's format), float8 on Ada/Hopper GPUs; the adapters still train in float32",
        choices=QUANTIZATIONS,
    )
    cuda_graphs: bool = option(
        False,
        "capture the whole training step (forward, backward, optimizer) as a CUDA graph and replay it: the host "
        "cost of a step no longer grows with the layers (CUDA, SD 1.x/2.x DreamBooth, AdamW, static shapes)",
    )
    report_to: str = option("tensorboard", "tensorboard, wandb, all or none", same_run=False)
    logging_dir: str = option("logs", "TensorBoard folder inside --output_dir", same_run=False)
    dataloader_num_workers: int = option(0, "data loading processes", minimum=0, same_run=False)
    local_rank: int = option(-1, "set by the launcher", same_run=False)
    quiet: bool = option(False, "no progress output", same_run=False)
    progress_steps: int | None = option(
        None, "when the output is not a terminal (a log file, a pipe): one progress line every N steps instead of a "
        "progress bar (default: about 50 lines a run)", minimum=1, same_run=False,
    )  # fmt: skip
    push_to_hub: bool = option(
        False, "upload the adapter, its model card and the sample images to the Hugging Face Hub at the end (needs "
        "huggingface_hub)", same_run=False,
    )  # fmt: skip
    hub_model_id: str | None = option(
        None, "the Hub repository to push to, 'name' or 'user/name' (default: the name of --output_dir)", same_run=False
    )
    hub_token: str | None = option(
        None, "Hub token for --push_to_hub (default: the login of `hf auth login` or HF_TOKEN); never written to "
        "checkpoints, logs or the model card", same_run=False, secret=True,
    )  # fmt: skip

    # --- validation ----------------------------------------------------------------------------------------------
    validation_prompt: str | None = option(None, "prompt sampled during training and after it", same_run=False)
    num_validation_images: int = option(4, "images per validation", minimum=1, same_run=False)
    validation_steps: int | None = option(
        None, "validate every N steps (and at step 0: the base model)", minimum=1, same_run=False
    )
    validation_inference_steps: int = option(25, "sampling steps of validation images", minimum=1, same_run=False)
    validation_guidance_scale: float = option(7.5, "guidance of validation images", minimum=0.0, same_run=False)
    validation_scheduler: str = option(
        "DPMSolverMultistepScheduler", "sampler of validation images and the final reload",
        choices=VALIDATION_SCHEDULERS, same_run=False,
    )  # fmt: skip
    validation_epochs: int | None = option(None, "validate every N epochs", minimum=1, same_run=False)
    no_final_reload: bool = option(
        False, "skip reloading the saved file into a fresh pipeline to sample it", same_run=False
    )

    def __post_init__(self):
        self.target_modules = target_names(self.target_modules)

    # --- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def build_parser(cls, prog: str | None = None) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=prog, description=cls.description)
        own = parser.add_argument_group(f"{cls.task_name} options")
        shared = parser.add_argument_group("model, adapter, loop and validation options (every task)")
        hints = typing.get_type_hints(cls)
        # the task's own flags: every field added to RunConfig's (DreamBoothXLConfig: DreamBooth's and its own)
        declared_here = {f.name for f in dataclasses.fields(cls)} - {f.name for f in dataclasses.fields(RunConfig)}
        fields = sorted(dataclasses.fields(cls), key=lambda f: f.name not in declared_here)  # the task's own first
        for f in fields:
            if not f.metadata.get("cli", True):
                continue
            kind, many = _flag_type(hints[f.name])
            kwargs: dict[str, Any] = {"help": f.metadata.get("help") or None}
            if kind is bool and f.default is not True:
                kwargs["action"] = "store_true"
            elif kind is bool:
                kwargs.update(type=_boolean, metavar="{true,false}")
            else:
                kwargs["type"] = kind
                if many:
                    kwargs["nargs"] = "+"
                if f.metadata.get("choices"):
                    kwargs["choices"] = f.metadata["choices"]
            if f.default is MISSING and f.default_factory is MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = f.default if f.default is not MISSING else f.default_factory()
                kwargs["help"] = _with_default(kwargs["help"], kwargs["default"], kwargs.get("action"))
            flag = f.metadata.get("flag") or f.name
            (own if f.name in declared_here else shared).add_argument(f"--{flag}", dest=f.name, **kwargs)
        foreign = parser.add_argument_group(
            "flags of diffusers' scripts with no ETHER counterpart (accepted as always so, or refused with the reason)"
        )
        for name, answer in sorted(cls.foreign_flags.items()):
            foreign.add_argument(
                f"--{name}",
                action=_ForeignFlagAction,
                answer=answer,
                nargs="*" if answer.takes_value else 0,
                metavar="VALUE" if answer.takes_value else None,
                default=argparse.SUPPRESS,
                help=("accepted: " if answer.accepted else "refused: ") + answer.reason.replace("%", "%%"),
            )
        return parser

    @classmethod
    def from_args(cls, argv: list[str] | None = None, prog: str | None = None):
        """Parse flags and validate; a bad combination exits with a usage error that says what to do."""
        parser = cls.build_parser(prog)
        namespace = parser.parse_args(argv)
        config = cls(**vars(namespace))
        try:
            return config.validate()
        except ConfigError as err:
            parser.error(str(err))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict:
        """``to_dict`` without secrets (``--hub_token``): what trackers and records may hold."""
        return {k: v for k, v in self.to_dict().items() if not _field(type(self), k).metadata.get("secret")}

    def defaults(self) -> dict:
        """Every field's default value (of the fields that have one)."""
        return {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}

    def identity(self) -> dict:
        """The fields that make two runs the same run (recorded in checkpoints; a resume must match them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("same_run", True)}

    @staticmethod
    def comparable(recorded: dict) -> dict:
        """A recorded identity (a checkpoint's, a benchmark folder's) in the JSON form ``identity()`` has now:
        ``target_modules`` written as one comma-separated string reads as its list of names."""
        if isinstance(recorded.get("target_modules"), str):
            return {**recorded, "target_modules": list(target_names(recorded["target_modules"]))}
        return recorded

    # --- checks ----------------------------------------------------------------------------------------------------
    def validate(self):
        """Check ranges, finiteness and contradictions; returns ``self`` (for chaining) or raises ConfigError."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, name = getattr(self, f.name), f.metadata.get("flag") or f.name
            kind, many = _flag_type(hints[f.name])
            if value is None:
                continue
            if kind in (int, float):
                for number in value if many and isinstance(value, (list, tuple)) else [value]:
                    _check_number(f, name, kind, number)
            choices = f.metadata.get("choices")
            if choices and not many and value not in choices:
                raise ConfigError(f"--{name} {value!r} is not one of {', '.join(map(str, choices))}")
        if self.learning_rate <= 0:
            raise ConfigError("--learning_rate must be positive")
        prompts = self.validation_prompt  # one prompt (DreamBooth) or a list (control)
        for prompt in prompts if isinstance(prompts, (list, tuple)) else [prompts]:
            try:
                check_prompt(str(prompt or ""), "--validation_prompt")
            except ValueError as err:
                raise ConfigError(str(err)) from None
        if self.resolution is not None and self.resolution % 8:
            raise ConfigError("--resolution must be a positive multiple of 8")
        if (self.validation_steps or self.validation_epochs) and not self.validation_prompt:
            raise ConfigError("--validation_steps/--validation_epochs need --validation_prompt")
        optimizer = str(self.optimizer).lower()
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer {self.optimizer!r} is not one of AdamW, prodigy")
        self.optimizer = optimizer
        if optimizer == "prodigy":
            if self.use_8bit_adam:
                raise ConfigError("--use_8bit_adam is an AdamW; with --optimizer prodigy drop it")
            try:
                import prodigyopt  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "--optimizer prodigy needs the prodigyopt package (pip install prodigyopt, or "
                    "pip install 'ether-diffusion[prodigy]'); or use --optimizer adamw"
                ) from None
        if self.enable_xformers_memory_efficient_attention:
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "--enable_xformers_memory_efficient_attention needs xformers (pip install xformers, on a CUDA "
                    "machine); without the flag the UNet uses torch's scaled-dot-product attention, which is as "
                    "memory-efficient on torch 2: drop the flag"
                ) from None
        if self.push_to_hub:
            try:
                import huggingface_hub  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "--push_to_hub needs huggingface_hub (pip install huggingface_hub, or "
                    "pip install 'ether-diffusion[hub]'); or drop the flag and upload the output folder yourself"
                ) from None
        elif self.hub_model_id or self.hub_token:
            raise ConfigError("--hub_model_id/--hub_token are for --push_to_hub: add it, or drop them")
        if self.use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ConfigError(
                    "--use_8bit_adam needs bitsandbytes (pip install bitsandbytes, on a CUDA machine); "
                    "or drop the flag to use torch's AdamW"
                ) from None
        if self.report_to in ("wandb", "all"):
            try:
                import wandb  # noqa: F401
            except ImportError:
                if self.report_to == "wandb":
                    raise ConfigError(
                        "--report_to wandb needs wandb (pip install wandb); or use --report_to tensorboard / none"
                    ) from None
        self._check_capturable()
        problem = check_quantization(self.base_quantization)
        if problem:
            raise ConfigError(problem)
        if self.base_quantization != "none" and self.cuda_graphs:
            raise ConfigError("--cuda_graphs is not checked with a quantised base: drop one of the two")
        if self.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError(
                "--mixed_precision fp16 needs a CUDA GPU; on this machine use --mixed_precision bf16 or no"
            )
        try:
            check_adapter_name(self.adapter_name)
        except ValueError as err:
            raise ConfigError(f"--adapter_name: {err}") from None
        if self.pretrained_model_name_or_path is None:
            self.pretrained_model_name_or_path = default_model()
        self.target_modules = target_names(self.target_modules)
        if not self.target_modules:
            raise ConfigError("--target_modules is empty: give a preset or module-path suffixes")
        self.adapter_config()  # EtherConfig's own checks, as a ConfigError
        return self

    def _check_capturable(self) -> None:
        """``--cuda_graphs`` with a flag whose work cannot sit in a replayed graph: refused, naming both."""
        if not self.cuda_graphs:
            return
        conflicts = {
            "--compile": (self.compile, "compiling and capturing are two ways to the same end; keep one"),
            "--gradient_accumulation_steps": (
                self.gradient_accumulation_steps > 1, "a captured step is one whole optimisation step"),
            "--gradient_checkpointing": (
                self.gradient_checkpointing, "its recomputation saves and restores the RNG state from the host"),
            "--use_8bit_adam": (self.use_8bit_adam, "bitsandbytes' optimizer is not capturable"),
            "--optimizer prodigy": (self.optimizer == "prodigy", "Prodigy's step reads its estimate on the host"),
            "--mixed_precision fp16": (
                self.mixed_precision == "fp16", "the loss scaler checks for overflow on the host every step; use bf16"),
        }  # fmt: skip
        for flag, (present, why) in conflicts.items():
            if present:
                raise ConfigError(f"--cuda_graphs cannot be used with {flag}: {why}. Drop one of the two")

    # --- derived ---------------------------------------------------------------------------------------------------
    def adapter_targets(self) -> str | list[str]:
        """``EtherConfig.target_modules`` of ``--target_modules`` (``adapter_targets``)."""
        return adapter_targets(self.target_modules)

    def adapter_config(self, target_modules: str | list[str] | None = None) -> EtherConfig:
        """The ETHER config of the flags (``target_modules`` overrides the flag, e.g. for the text encoder)."""
        sides = {"auto": None, "input": ("input",), "output": ("output",), "both": SIDES}[self.ether_sides]
        try:
            return EtherConfig(
                target_modules=target_modules or self.adapter_targets(),
                method=self.ether_method,
                n_blocks=int(self.n_blocks),
                sides=sides,
                init_seed=int(self.seed),
            )
        except ValueError as err:
            raise ConfigError(str(err)) from err


def _check_number(f: dataclasses.Field, name: str, kind: type, value) -> None:
    """``ConfigError`` naming the flag when ``value`` is not a number of its kind, not finite, or out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"--{name} must be a number, not {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"--{name} is {value}: give a finite number")
    if kind is int and value != int(value):
        raise ConfigError(f"--{name} must be a whole number, not {value!r}")
    minimum, maximum = f.metadata.get("minimum"), f.metadata.get("maximum")
    if minimum is not None and value < minimum:
        raise ConfigError(f"--{name} must be at least {_number(minimum)}, not {_number(value)}")
    bound = MAX_INT_FLAG if kind is int else MAX_FLOAT_FLAG
    why = _WHY[kind] if maximum is None else ""
    if value > (bound if maximum is None else maximum):
        most = _number(bound if maximum is None else maximum)
        raise ConfigError(f"--{name} {_number(value)} is too large: give at most {most}{why}")
    if value < -bound:
        raise ConfigError(f"--{name} {_number(value)} is too small: give at least {_number(-bound)}{why}")


def _number(value) -> str:
    """A flag's number as it would be typed: whole numbers in full (up to 128 bits), others short (1e38)."""
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 128 else f"a number of {value.bit_length()} bits"
    return str(int(value)) if value.is_integer() and abs(value) < 1e16 else f"{value:g}".replace("e+", "e")


def _field(cls, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _boolean(text: str) -> bool:
    """``true``/``false`` (also 1/0, yes/no) for switches that are on by default."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return value


def _with_default(text: str | None, default, action: str | None) -> str | None:
    """A flag's help with its default, as users of diffusers' scripts read it from ``--help``; a switch that is off
    and a value that is absent by default say nothing more, nor does a help that already names its default."""
    if default is None or action == "store_true" or (text and "default" in text):
        return text
    shown = ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
    return f"{text or ''} (default: {shown.replace('%', '%%')})".lstrip()


class _ForeignFlagAction(argparse.Action):
    """A diffusers flag without a field: nothing to store when accepted, a usage error with the reason if refused."""

    def __init__(self, option_strings, dest, answer: ForeignFlag, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.answer = answer

    def __call__(self, parser, namespace, values, option_string=None):
        if not self.answer.accepted:
            parser.error(f"{option_string} does not apply to ETHER: {self.answer.reason}")


def adapter_targets(names: tuple[str, ...] | list[str]) -> str | list[str]:
    """``EtherConfig.target_modules`` of target names: one preset by its name, else every suffix with the presets among
    them spelled out."""
    if len(names) == 1 and names[0] in TARGET_PRESETS:
        return names[0]
    return list(dict.fromkeys(s for name in names for s in TARGET_PRESETS.get(name, (name,))))


def _flag_type(annotation) -> tuple[type, bool]:
    """``(element type, is a list)`` of a field annotation such as ``int | None`` or ``list[str] | None``."""
    union = typing.get_origin(annotation) not in (list, tuple)
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if union else []
    inner = (args or [annotation])[0]
    if typing.get_origin(inner) in (list, tuple):
        return typing.get_args(inner)[0], True
    return inner, False
