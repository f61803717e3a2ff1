"""The training loop every task runs: accelerate, optimizer, schedule, checkpoints with exact resume, validation,
callbacks, the final save and teardown. Tasks (``task.py``) say what trains and on what; nothing here knows about
DreamBooth or control.

    result = Trainer(DreamBoothTask(config), callbacks=[MyCallback()]).train()

``train()`` runs named steps around a small ``LoopState``, each one screen long:

    build       seeds, the task's model and adapters (``task.setup``), its data (class images drawn here)
    prepare     optimizer, data loader, schedule, compiled blocks, ``accelerator.prepare``, checkpoint hooks, trackers
    resume      ``--resume_from_checkpoint``: step, epoch, batches to skip, the checkpoint's tensors
    baseline    the step-0 samples of the base model
    loop        epochs of ``step`` (one batch: ``_update``'s loss, backward and optimizer, or with --cuda_graphs the
                replay of its CUDA graph, ``graphs.py``) and ``after_step`` (logs, callbacks, ``checkpoint`` and
                ``validate`` when due, stop)
    finish      the adapter file, the reloaded file's samples, the model card, the hub upload, teardown

Run under ``accelerate launch`` (data parallel, mixed precision) or plain ``python``. Guarantees:

- a checkpoint folder is complete or absent; it records the run it belongs to (``run.json``), and resuming a
  checkpoint of another run (other flags, another task) is refused with the fields that differ;
- ``--resume_from_checkpoint`` continues bit-exactly where the checkpoint left off (data order, noise, optimizer);
- a non-finite loss or adapter vector stops the run with ``TrainingDivergedError`` before anything is written:
  the last checkpoint and any adapter file already in the output folder stay as they were;
- the adapter file is written atomically (a killed run or a full disk leaves the previous file).
"""

from __future__ import annotations

import gc
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import directions
from .._version import __version__
from ..checkpoints import checkpoint_step, latest_checkpoint, list_checkpoints
from ..config import DTYPES
from ..sampling import SamplingInterrupted, interruptible
from .artifacts import make_grid, save_samples, write_text
from .callbacks import Callback, CallbackList, Preparation, ValidationEvent
from .checkpoints import save_checkpoint
from .config import ConfigError
from .data import EpochShuffleSampler
from .graphs import CapturedStep, capturable_lr
from .hub import create_repository, upload_output
from .progress import Progress
from .run import Run
from .task import SampleKind, Task

__all__ = ["LoopState", "ResumeMismatchError", "TrainResult", "Trainer", "TrainingDivergedError", "TrainingStopped"]

RUN_RECORD = "run.json"


class TrainingDivergedError(RuntimeError):
    """The loss or the trained tensors became NaN or infinite; nothing was saved from the diverged state."""


class ResumeMismatchError(ValueError):
    """The checkpoint to resume belongs to another run."""


class TrainingStopped(Exception):
    """Raised inside preparation when a callback asks to stop before the first step."""


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
    mixed_precision: str = "no"
    num_processes: int = 1
    compiled: str | None = None  # the torch.compile backend the trained modules ran under, if any
    exports: list[Path] = field(default_factory=list)  # files made from the adapter at the end (a kohya LoRA)

    def report(self) -> str:
        """Where a finished run put what it wrote: the adapter, the model card and samples, checkpoints, validation
        images and logs (what the loop prints at its end, also under ``accelerate launch``)."""
        out = self.output_dir
        lines = [f"trained {self.global_step} steps in {self.train_seconds:.0f} s" + (" (stopped early)"
                 if self.stopped_early else "") + f"; written to {out}:"]  # fmt: skip
        if self.adapter_path is not None:
            lines.append(f"  adapter          {self.adapter_path}")
        lines += [f"  LoRA export      {path}" for path in self.exports]
        for name, what in (("README.md", "model card"), ("samples.png", "final samples")):
            if (out / name).is_file():
                lines.append(f"  {what:<16} {out / name}")
        checkpoints = list_checkpoints(out)
        if checkpoints:
            names = ", ".join(path.name for path in checkpoints)
            lines.append(f"  checkpoints      {names} (resume: --resume_from_checkpoint latest)")
        if self.validation_images:
            folder = self.validation_images[0].parent
            lines.append(f"  validation       {len(self.validation_images)} images in {folder}")
        return "\n".join(lines)


def check_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):  # a name of its own: several processes check at once
            pass
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


def _json_ready(value):
    return json.loads(json.dumps(value))


def compile_blocks(modules: dict[str, torch.nn.Module], backend: str) -> list[str]:
    """diffusers' regional compilation of each module that names its repeated blocks (``compile_repeated_blocks``:
    the UNet's transformer blocks, SD3's and Flux's transformer blocks), in place; the others (text encoders) stay
    eager. Returns what was compiled, e.g. ``["unet: 16 BasicTransformerBlock"]``."""
    compiled = []
    for name, module in modules.items():
        kinds = getattr(module, "_repeated_blocks", None)
        if not kinds or not hasattr(module, "compile_repeated_blocks"):
            continue
        module.compile_repeated_blocks(backend=backend)
        found = [m for m in module.modules() if type(m).__name__ in kinds]
        compiled.append(f"{name}: {len(found)} {'/'.join(sorted({type(m).__name__ for m in found}))}")
    return compiled


def build_optimizer(config, groups: list[dict]):
    """The run's optimizer over ``groups``: AdamW (8-bit with --use_8bit_adam; capturable with --cuda_graphs) or
    Prodigy."""
    if config.optimizer == "prodigy":  # diffusers' train_dreambooth_lora_sdxl.py choice; lr ~1.0 scales its step
        import prodigyopt

        return prodigyopt.Prodigy(
            groups,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            beta3=config.prodigy_beta3,
            weight_decay=config.adam_weight_decay,
            eps=config.adam_epsilon,
            decouple=config.prodigy_decouple,
            use_bias_correction=config.prodigy_use_bias_correction,
            safeguard_warmup=config.prodigy_safeguard_warmup,
        )
    if config.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    # one multi-tensor update for all vectors (on a CPU the default updates them one by one: ~10 operations per
    # tensor; the results are the same, tested); a captured step keeps AdamW's step count and learning rate on the
    # device (graphs.py)
    capture = {"capturable": True, "foreach": True} if config.cuda_graphs else {}
    if optimizer_class is torch.optim.AdamW:
        capture["foreach"] = True
    return optimizer_class(
        groups,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.adam_weight_decay,
        eps=config.adam_epsilon,
        **capture,
    )


def build_schedule(config, optimizer, max_train_steps: int, num_processes: int = 1):
    """diffusers' learning-rate schedule of the flags over ``max_train_steps`` (accelerate steps it per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )


@dataclass
class LoopState:
    """What the trainer's steps share: the run, the data and what accelerate prepared, and where the loop is."""

    run: Run
    output_dir: Path
    dataset: object
    groups: list[dict] = field(default_factory=list)  # the optimizer's parameter groups
    params: list[torch.nn.Parameter] = field(default_factory=list)  # every trained tensor
    models: list[torch.nn.Module] = field(default_factory=list)  # the trained modules, wrapped by accelerate
    sampler: EpochShuffleSampler | None = None
    loader: object = None
    optimizer: object = None
    lr_scheduler: object = None
    progress: Progress | None = None
    updates_per_epoch: int = 1
    max_train_steps: int = 0
    step: int = 0  # optimisation steps done (the global step)
    epoch: int = 0  # the epoch to start from
    skip_batches: int = 0  # batches of that epoch a resumed run has already trained on
    captured: CapturedStep | None = None  # --cuda_graphs: the step, captured on its first batch
    stop: bool = False  # a callback asked to stop


class Trainer:
    def __init__(self, task: Task, callbacks: list[Callback] | tuple = ()):
        self.task = task
        self.config = task.config
        self.callbacks = CallbackList(callbacks)
        #: whether this process writes samples and the output folder: the main process of data parallel (None); a
        #: packed run's process writes its own jobs' (True, ``pack.py``)
        self.writer: bool | None = None
        self.hub_repo = None  # the hub repository --push_to_hub uploads to (created before training)

    def writes(self, accelerator) -> bool:
        return accelerator.is_main_process if self.writer is None else self.writer

    # --- pieces ------------------------------------------------------------------------------------------------
    def _prepare(self, message: str, done: int | None = None, total: int | None = None) -> None:
        self.callbacks.on_prepare(Preparation(message, done, total))
        if self.callbacks.should_stop():
            raise TrainingStopped(message)

    def _accelerator(self, output_dir: Path):
        from accelerate import Accelerator
        from accelerate.utils import AutocastKwargs, ProjectConfiguration

        config = self.config
        report_to = None if config.report_to in (None, "none") else config.report_to
        has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available()
        accelerator = Accelerator(
            cpu=not has_accelerator,  # lets `accelerate launch --multi_gpu` / torchrun run data parallel on CPUs
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            # --compile_scope model: prepare() compiles what trains; blocks: compile_blocks() below
            dynamo_backend=config.dynamo_backend if config.compile and config.compile_scope == "model" else None,
            log_with=report_to,
            project_config=ProjectConfiguration(
                project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)
            ),
            # autocast's cache of cast weights lives between a graph's capture and its replays: off while capturing
            kwargs_handlers=[AutocastKwargs(cache_enabled=False)] if config.cuda_graphs else None,
        )
        if config.cuda_graphs and accelerator.device.type != "cuda":
            raise ConfigError(
                f"--cuda_graphs replays the training step as a CUDA graph and needs a CUDA GPU; on this "
                f"{accelerator.device.type} machine drop --cuda_graphs"
            )
        if config.cuda_graphs and accelerator.num_processes > 1:
            raise ConfigError(
                f"--cuda_graphs captures one process's step; with {accelerator.num_processes} processes drop "
                "--cuda_graphs (or launch one process)"
            )
        if accelerator.mixed_precision == "fp16" and accelerator.device.type != "cuda":
            raise ConfigError(
                "fp16 mixed precision (from --mixed_precision or accelerate's configuration) needs a CUDA GPU; on "
                f"this {accelerator.device.type} machine use --mixed_precision bf16 or no"
            )
        if config.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        return accelerator

    def _optimizer(self, groups: list[dict]):
        return build_optimizer(self.config, groups)

    def _resume(self, accelerator, output_dir: Path, updates_per_epoch: int) -> tuple[int, int, int]:
        """Load ``--resume_from_checkpoint`` (a folder or "latest"); returns ``(global_step, first_epoch, batches to
        skip in that epoch)``, zeros for a new run."""
        wanted = self.config.resume_from_checkpoint
        if not wanted:
            return 0, 0, 0
        path = latest_checkpoint(output_dir) if wanted == "latest" else Path(wanted)
        if path is None:
            accelerator.print(f"no checkpoint in '{output_dir}' to resume from: starting a new run")
            return 0, 0, 0
        if not path.is_dir():
            raise FileNotFoundError(
                f"--resume_from_checkpoint '{path}' does not exist; pass a checkpoint-N folder or 'latest'"
            )
        self._check_same_run(path)
        accelerator.print(f"resuming from {path}")
        accelerator.load_state(str(path))
        step = checkpoint_step(path)
        skip = (step % updates_per_epoch) * self.config.gradient_accumulation_steps
        return step, step // updates_per_epoch, skip

    def _run_record(self) -> dict:
        task = self.task
        return {"task": task.name, "adapters": task.adapters.kind, "config": _json_ready(self.config.identity())}

    def _check_same_run(self, checkpoint: Path) -> None:
        record_file = checkpoint / RUN_RECORD
        if not record_file.is_file():  # written by ether-diffusion before 0.2: nothing to compare
            return
        try:
            record = json.loads(record_file.read_text())
            recorded, recorded_task = self.config.comparable(dict(record["config"])), record["task"]
            # a record without "adapters" names a PEFT peer in its configuration ("peer"), or trained ETHER
            recorded_adapters = record.get("adapters") or recorded.pop("peer", None) or "ether"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ResumeMismatchError(f"'{record_file}' is unreadable ({err}); cannot tell whose run it is") from err
        current = self._run_record()
        if recorded_adapters != current["adapters"]:
            raise ResumeMismatchError(
                f"'{checkpoint}' trained {recorded_adapters} adapters, this run trains {current['adapters']}; start "
                "this run in another --output_dir"
            )
        # a field added to the configuration after the checkpoint was written: the run used its default
        defaults = self.config.defaults()
        recorded = {**_json_ready({k: v for k, v in defaults.items() if k in current["config"]}), **recorded}
        if recorded_task != current["task"]:
            raise ResumeMismatchError(
                f"'{checkpoint}' is a checkpoint of a {recorded_task} run, not of this {current['task']} run; "
                "resume it with its own script, or start this run in another --output_dir"
            )
        differ = sorted(
            k for k in set(recorded) | set(current["config"]) if recorded.get(k) != current["config"].get(k)
        )
        if differ:
            shown = "; ".join(
                f"--{k}: checkpoint {recorded.get(k)!r}, now {current['config'].get(k)!r}" for k in differ[:6]
            )
            raise ResumeMismatchError(
                f"'{checkpoint}' belongs to another run ({shown}). Resume with the flags it was trained with, or "
                "start this run in a new --output_dir (or without --resume_from_checkpoint)"
            )

    def _check_finite(self, params, step: int, what: str) -> None:
        if all(bool(torch.isfinite(p).all()) for p in params):
            return
        raise TrainingDivergedError(
            f"the trained vectors hold NaN or infinite values at step {step}, before {what}; nothing was saved "
            f"from this state (earlier checkpoints and adapter files are untouched). Lower --learning_rate "
            f"({self.config.learning_rate:g}) or --max_grad_norm, then resume from the last checkpoint"
        )

    # --- the run, in named steps ---------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run the task to the end (or until a callback stops it); returns what was trained and where it is."""
        output_dir = Path(self.config.output_dir)
        check_output_dir(output_dir)
        self.task.check_inputs()  # fail before any model loads
        refusal = self.config.cuda_graphs and self.task.capture_refusal()
        if refusal:
            raise ConfigError(f"--cuda_graphs: {refusal}; drop --cuda_graphs (or what it names)")
        accelerator = self._accelerator(output_dir)
        self.hub_repo = None
        if self.config.push_to_hub and accelerator.is_main_process:  # a missing login fails now, not after the run
            self.hub_repo = create_repository(self.config.hub_model_id, output_dir, self.config.hub_token)
        self.result = TrainResult(None, output_dir, 0, False, 0.0, 0, mixed_precision=accelerator.mixed_precision,
                                  num_processes=accelerator.num_processes)  # fmt: skip
        try:
            try:
                state = self.build(accelerator, output_dir)
            except (TrainingStopped, SamplingInterrupted):  # stopped while preparing: nothing trained
                return self.stopped_before_training()
            self.prepare(state)
            self.resume(state)
            if not self.baseline(state):
                return self.stopped_before_training()
            self.loop(state)
            return self.finish(state)
        finally:
            accelerator.end_training()  # closes the trackers, also after an error

    def build(self, accelerator, output_dir: Path) -> LoopState:
        """Seeds, the task's model and adapters, its data: everything before the optimizer exists."""
        from accelerate.utils import set_seed

        config, task = self.config, self.task
        set_seed(config.seed)
        self._prepare("loading the base model")
        noise_generator = torch.Generator(device=accelerator.device)
        noise_generator.manual_seed(config.seed + accelerator.process_index)
        run = Run(accelerator, DTYPES.get(accelerator.mixed_precision, torch.float32), noise_generator)  # "no": fp32
        task.setup(run)
        self._prepare("preparing the data")
        with interruptible(self.callbacks.should_stop):  # class images stop between denoising steps
            dataset = task.dataset(run, self._prepare)
        return LoopState(run, output_dir, dataset)

    def prepare(self, state: LoopState) -> None:
        """The optimizer, the data loader and the schedule, compiled and wrapped by accelerate; checkpoint hooks and
        trackers."""
        config, task, accelerator = self.config, self.task, state.run.accelerator
        groups = state.groups = task.parameter_groups()
        state.params = [p for group in groups for p in group["params"]]
        self.result.trainable_parameters = sum(p.numel() for p in state.params)
        if config.scale_lr:
            scale = config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
            for group in groups:
                group["lr"] *= scale
        state.sampler = EpochShuffleSampler(len(state.dataset), seed=config.seed)
        loader = torch.utils.data.DataLoader(
            state.dataset,
            batch_size=config.train_batch_size,
            sampler=state.sampler,
            collate_fn=state.dataset.collate,
            num_workers=config.dataloader_num_workers,
            # a captured step replays one batch shape: no last partial batch
            drop_last=(task.drop_last or config.cuda_graphs) and len(state.dataset) >= config.train_batch_size,
            generator=torch.Generator().manual_seed(config.seed),
        )
        batches_per_epoch = max(1, math.ceil(len(loader) / accelerator.num_processes))
        state.updates_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
        state.max_train_steps = config.max_train_steps or config.num_train_epochs * state.updates_per_epoch
        optimizer = self._optimizer(groups)
        if config.cuda_graphs:
            capturable_lr(optimizer, accelerator.device)  # before the schedule reads the rates
        lr_scheduler = build_schedule(config, optimizer, state.max_train_steps, accelerator.num_processes)
        trainable = task.trainable_modules()
        blocks = (
            compile_blocks(trainable, config.dynamo_backend)
            if config.compile and config.compile_scope == "blocks"
            else []
        )
        prepared = accelerator.prepare(*trainable.values(), optimizer, loader, lr_scheduler)
        state.run.prepared = dict(zip(trainable, prepared[: len(trainable)]))
        state.optimizer, state.loader, state.lr_scheduler = prepared[len(trainable) :]
        state.models = list(state.run.prepared.values())
        if any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in state.models):
            self.result.compiled = config.dynamo_backend
        elif blocks:
            self.result.compiled = f"{config.dynamo_backend} ({', '.join(blocks)})"
        self._register_checkpointing(state)
        if config.cuda_graphs:
            self.result.compiled = "no (the step replayed as a CUDA graph, --cuda_graphs)"  # the model card says it
            state.captured = CapturedStep(
                lambda batch: self._update(state, batch), state.optimizer, state.params, [state.run.noise_generator]
            )
        if accelerator.is_main_process and config.report_to not in (None, "none"):
            tracked = {k: v for k, v in config.public_dict().items() if isinstance(v, (int, float, str, bool))}
            project = getattr(config, "tracker_project_name", None) or f"ether-{task.name}"
            accelerator.init_trackers(project, config=tracked)

    def _register_checkpointing(self, state: LoopState) -> None:
        """Checkpoints hold the task's file (not the frozen weights), the optimizer, schedule, RNG states, step and
        the run record."""
        task, accelerator = self.task, state.run.accelerator

        def save_hook(models, weights, folder):
            if accelerator.is_main_process:
                task.save(Path(folder) / task.weight_name)
                write_text(Path(folder) / RUN_RECORD, json.dumps(self._run_record(), indent=1))
            weights.clear()

        def load_hook(models, folder):
            task.load_checkpoint(Path(folder) / task.weight_name)
            models.clear()

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)
        accelerator.register_for_checkpointing(_GeneratorState(state.run.noise_generator))

    def resume(self, state: LoopState) -> None:
        """``--resume_from_checkpoint``: the step, epoch and batches to skip of the checkpoint, its tensors loaded."""
        state.step, state.epoch, state.skip_batches = self._resume(
            state.run.accelerator, state.output_dir, state.updates_per_epoch
        )
        if self.config.cuda_graphs and state.step:  # a loaded optimizer state may bring its rates on the CPU
            capturable_lr(state.optimizer, state.run.accelerator.device)
        self.result.global_step = state.step

    def baseline(self, state: LoopState) -> bool:
        """The step-0 samples of the base model (with ``--validation_steps``); False when a stop came meanwhile."""
        if state.step or not self.task.wants_validation() or not self.config.validation_steps:
            return True
        self.callbacks.on_prepare(Preparation("sampling the step-0 baseline (the base model)"))
        try:
            self.validate(state, SampleKind.BASELINE)
        except SamplingInterrupted:  # stopped before the first step: nothing trained, nothing to save
            return False
        return True

    def stopped_before_training(self) -> TrainResult:
        self.result.stopped_early = True
        self.callbacks.on_train_end(self.result)
        return self.result

    def loop(self, state: LoopState) -> None:
        """Epochs of batches, one optimisation step at a time, until the last step or a stop."""
        config, accelerator = self.config, state.run.accelerator
        self.callbacks.on_train_start(state.max_train_steps, state.step)  # from here on, every second is training
        state.progress = Progress(state.max_train_steps, "step", initial=state.step, every=config.progress_steps,
                                  disable=config.quiet or not accelerator.is_local_main_process)  # fmt: skip
        for model in state.models:
            model.train()
        start = time.time()
        # a checkpoint of the last step (a run killed during its final save) leaves nothing to train
        num_epochs = math.ceil(state.max_train_steps / state.updates_per_epoch)
        last_epoch = num_epochs if state.step < state.max_train_steps else state.epoch
        for epoch in range(state.epoch, last_epoch):
            state.sampler.set_epoch(epoch)
            state.dataset.set_epoch(epoch)
            loader = (
                accelerator.skip_first_batches(state.loader, state.skip_batches) if state.skip_batches else state.loader
            )
            if hasattr(loader, "set_epoch"):  # accelerate re-sets the sampler's epoch from its own counter
                loader.set_epoch(epoch)
            state.skip_batches = 0
            for batch in loader:
                logs = self.step(state, batch)
                if logs is not None and self.after_step(state, logs):
                    break
            if state.stop or state.step >= state.max_train_steps:
                break
        state.progress.close()
        self.result.train_seconds = time.time() - start
        self.result.global_step = state.step

    def step(self, state: LoopState, batch: dict) -> dict[str, float] | None:
        """One batch through the task's loss, backward, clipping and the optimizer: the step's logs when it ends an
        optimisation step (``None`` while gradients accumulate). A non-finite loss stops the run."""
        config, accelerator = self.config, state.run.accelerator
        with accelerator.accumulate(*state.models):
            if state.captured is not None:  # the graph writes the gradients in place: they stay allocated
                parts = state.captured(batch)
                # a replay changes the vectors without bumping their versions: no prepared direction is current
                directions.touch()
            else:
                parts = self._update(state, batch)
            state.lr_scheduler.step()
            if state.captured is None:
                state.optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            return None
        state.step += 1
        logs = {k: float(v) for k, v in parts.items()}
        if not math.isfinite(logs["loss"]):
            raise TrainingDivergedError(
                f"the loss is {logs['loss']} at step {state.step}: training diverged. Nothing was saved from this "
                f"state (earlier checkpoints and adapter files are untouched). Lower --learning_rate "
                f"({config.learning_rate:g}), then resume from the last checkpoint or start again"
            )
        lrs = state.lr_scheduler.get_last_lr()
        logs["lr"] = lrs[-1]
        for group, lr in zip(state.groups[:-1], lrs[:-1]):
            logs[f"{group.get('name', 'group')}_lr"] = lr
        return logs

    def _update(self, state: LoopState, batch: dict) -> dict[str, torch.Tensor]:
        """The batch's loss, its backward, clipping and the optimizer's step (what ``--cuda_graphs`` captures):
        the loss's parts, as tensors."""
        config, accelerator = self.config, state.run.accelerator
        loss, parts = self.task.loss(batch, state.run)
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.max_grad_norm:
            accelerator.clip_grad_norm_(state.params, config.max_grad_norm)
        state.optimizer.step()
        return parts

    def after_step(self, state: LoopState, logs: dict[str, float]) -> bool:
        """Progress, logs and callbacks of a finished step, then its checkpoint and previews when due; True when the
        run ends here (the last step, or a stop: a stopped run keeps a checkpoint to resume from)."""
        config, step = self.config, state.step
        state.progress.update(step, loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
        self.result.losses.append(logs["loss"])
        state.run.accelerator.log(logs, step=step)
        self.callbacks.on_step(step, logs)
        interrupted = False
        with state.progress.paused():  # the time left counts training steps, not saving and sampling
            if step % config.checkpointing_steps == 0:
                self.checkpoint(state)
            if self.validation_due(state):
                try:
                    self.validate(state, SampleKind.PREVIEW)
                except SamplingInterrupted:
                    interrupted = True
        if interrupted or self.callbacks.should_stop():
            state.stop = self.result.stopped_early = True
            if step % config.checkpointing_steps:  # a checkpoint to resume from, unless just saved
                self.checkpoint(state)
        return state.stop or step >= state.max_train_steps

    def checkpoint(self, state: LoopState) -> None:
        self._check_finite(state.params, state.step, "a checkpoint")
        path = save_checkpoint(state.run.accelerator, state.output_dir, state.step, self.config.checkpoints_total_limit)
        self.callbacks.on_checkpoint(state.step, path)

    def validation_due(self, state: LoopState) -> bool:
        config, step = self.config, state.step
        if not self.task.wants_validation():
            return False
        every_epochs = getattr(config, "validation_epochs", None)
        return bool(
            (config.validation_steps and step % config.validation_steps == 0)
            or (every_epochs and step and step % (state.updates_per_epoch * every_epochs) == 0)
        )

    def validate(self, state: LoopState, kind: SampleKind, adapter_path: Path | None = None) -> None:
        """The task's samples of ``kind`` (on the main process), written and shown to the trackers and callbacks."""
        accelerator, step = state.run.accelerator, state.step
        if not self.writes(accelerator):
            return
        for model in state.models:
            model.eval()
        try:
            with interruptible(self.callbacks.should_stop):  # a stop ends the sampling: SamplingInterrupted
                samples = self.task.samples(state.run, kind, adapter_path)
        finally:
            for model in state.models:
                model.train()
        if samples is None or not samples.images:
            return
        if kind is SampleKind.FINAL:
            path = state.output_dir / "samples.png"
            make_grid(samples.images, samples.columns).save(path)
            paths = [path]
        else:
            paths = save_samples(samples.images, state.output_dir / "validation", f"step-{step:06d}", samples.columns)
            self.result.validation_images.extend(paths)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                stacked = np.stack([np.asarray(i) for i in samples.images])
                tracker.writer.add_images(f"validation/{kind}", stacked, step, dataformats="NHWC")
        self.callbacks.on_validation(ValidationEvent(step, kind, samples.images, paths, samples.prompts))

    def finish(self, state: LoopState) -> TrainResult:
        """The adapter file (checked finite), the reloaded file's samples, the model card and the hub upload, on the
        main process; then every process tears data parallel down together."""
        result, accelerator = self.result, state.run.accelerator
        accelerator.wait_for_everyone()
        check_replicas_agree(accelerator, state.params)
        if accelerator.is_main_process:
            self.save_outputs(state)
        if accelerator.num_processes > 1:
            state.models.clear()
            state.run.prepared.clear()
            release_wrappers(accelerator)
        self.callbacks.on_train_end(result)
        return result

    def save_outputs(self, state: LoopState) -> None:
        """What a finished run writes: the adapter file (checked finite), its exports, the reloaded file's samples,
        the model card and the hub upload; then the report of where it all went."""
        config, task, result = self.config, self.task, self.result
        accelerator = state.run.accelerator
        self._check_finite(state.params, state.step, "the final save")
        extra = {
            "steps": str(state.step),
            "learning_rate": str(config.learning_rate),
            "trained_with": f"ether-diffusion {__version__} {task.name}",
            "num_processes": str(accelerator.num_processes),
        }
        result.adapter_path = task.save(state.output_dir / task.weight_name, extra)
        self.callbacks.on_save(result.adapter_path)
        result.exports = task.after_save(result.adapter_path, state.run)
        samples_file = None
        if task.wants_validation() and not config.no_final_reload and not result.stopped_early:
            try:
                self.validate(state, SampleKind.FINAL, result.adapter_path)
                samples_file = "samples.png"
            except SamplingInterrupted:  # a stop during the final samples: the file is saved, skip them
                pass
        card = task.model_card(result, samples_file)
        if card:
            write_text(state.output_dir / "README.md", card)
        if self.hub_repo is not None:
            upload_output(self.hub_repo, state.output_dir, task.weight_name, config.hub_token,
                          f"ether-diffusion {task.name}: {state.step} steps")  # fmt: skip
            accelerator.print(f"pushed to https://huggingface.co/{self.hub_repo}")
        print(result.report(), flush=True)  # the script under accelerate launch says where it all went, too


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
