"""Many adapters, one step: DreamBooth runs trained side by side in one batch, queued, and sharded over processes.

The fixed cost of a training step (the host's work per layer, the base model's weights read once per product) does
not grow with the batch, so K runs in one batch cost far less than K steps. A packed run holds K slots; the samples
of slot k (its instance images and, with prior preservation, its class images) run through adapter k only
(``slots.SlotRoute``), and each slot keeps what makes it its own run:

    data         its dataset, data order and augmentation (``seed``), its batch size
    draws        its noise generator: latents, noise and timesteps drawn exactly as its solo run draws them
    loss         normalised over its own samples (prior preservation, min-SNR, offset noise as it asks), so its
                 gradient is the one it gets alone; the step sums the slots' losses (each slot's vectors see only
                 its own term)
    optimizer    its own AdamW / Prodigy, learning rate, schedule, clipping and step count

A slot that reaches its step count writes what its solo run writes into its own folder (the adapter, model card,
final samples, previews, kohya export; ``Trainer.save_outputs``) and the next job waiting takes its place; a slot
whose loss turns NaN is stopped and reported, and the others go on. The packed run checkpoints all its slots at once
(``<state>/process-<i>-of-<n>/pack-<g>/checkpoint-<step>``: each slot's vectors, optimizer, schedule, generator and
data position, and the queue), so a killed run resumes to the adapters the uninterrupted run gives, bit for bit.

Jobs whose shared settings differ (model, resolution, adapter layout, precision: everything ``PER_JOB`` does not
name) run in separate packs, one after the other. Under ``accelerate launch --num_processes N`` process ``i`` takes
jobs ``i, i + N, ...``: jobs never share a process, so no two processes write one run, and a job trains as it does
in one process (its generator is seeded from its own seed, not the process index).
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import COMPLETE_MARKER, latest_checkpoint, partial_folder, prune_checkpoints, write_failed
from ..config import DTYPES
from ..inject import active_adapters, adapter_layers, adapter_names, delete_adapter, set_active_adapters
from ..sampling import SamplingInterrupted, interruptible
from ..slots import SlotPlan, SlotRoute, check_same_layout
from .artifacts import write_text
from .callbacks import Callback
from .config import ConfigError, RunConfig
from .data import EpochShuffleSampler
from .hub import create_repository
from .progress import Progress
from .run import Run
from .sd import Draws
from .task import SampleKind, Task
from .trainer import (
    LoopState,
    ResumeMismatchError,
    Trainer,
    TrainingDivergedError,
    TrainResult,
    _json_ready,
    build_optimizer,
    build_schedule,
    check_output_dir,
)

__all__ = ["DEFAULT_PACK", "PER_JOB", "Job", "PackResult", "PackedTrainer", "pack_key", "pack_refusal"]

#: the flags a job sets for itself; jobs that agree on every other flag of their run share a pack
PER_JOB = frozenset(
    {
        # the subject and its data
        "instance_data_dir", "instance_prompt", "dataset_name", "dataset_config_name", "image_column",
        "caption_column", "caption_extension", "repeats", "class_data_dir", "class_prompt", "with_prior_preservation",
        "prior_loss_weight", "num_class_images", "center_crop", "random_flip", "image_interpolation_mode",
        "train_batch_size",
        # the run's randomness, length and optimisation
        "seed", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles", "lr_power",
        "optimizer", "use_8bit_adam", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
        "prodigy_beta3", "prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup",
        "max_grad_norm", "snr_gamma", "offset_noise", "text_encoder_lr", "adam_weight_decay_text_encoder",
        "adapter_name",
    }
)  # fmt: skip

#: runs per packed step when nothing else says (``train --jobs``, ``bench dreambooth``, the studio's queue): past it
#: more runs per step add little (docs/performance.md: K = 16 gives 3-16 % more adapters per hour for 7-33 % more
#: memory)
DEFAULT_PACK = 8
#: the families whose DreamBooth step packs (the UNet models: their loss is ``StableDiffusionBackend``'s)
PACKED_FAMILIES = ("sd", "sdxl")
STATE_RECORD = "pack.json"
FINISHED = "pack_finished"


def pack_refusal(config: RunConfig) -> str | None:
    """Why a job with ``config`` cannot train in a pack (which flag to drop), or None."""
    refused = {
        "--gradient_accumulation_steps": (config.gradient_accumulation_steps != 1, "a slot steps once per batch: give "
                                          "the samples as --train_batch_size"),
        "--cuda_graphs": (config.cuda_graphs, "a pack's batch changes as jobs come and go"),
        "--compile": (config.compile, "slots route samples per step, which graphs would re-trace"),
        "--resume_from_checkpoint": (config.resume_from_checkpoint, "a pack resumes as a whole (resume the pack)"),
        "--mixed_precision fp16": (config.mixed_precision == "fp16", "its loss scaling is per run; use bf16"),
        "--no_adapters": (getattr(config, "no_adapters", False), "an encoder-only run has no adapter to route"),
    }  # fmt: skip
    for flag, (given, why) in refused.items():
        if given:
            return f"{flag} does not pack ({why}); drop it from the job, or train the job alone"
    return None


def pack_key(config: RunConfig) -> str:
    """What jobs of one pack share: every identity field ``PER_JOB`` does not name."""
    shared = {k: v for k, v in _json_ready(config.identity()).items() if k not in PER_JOB}
    return json.dumps(shared, sort_keys=True)


@dataclass
class Job:
    """One run of a pack: its name (unique), validated configuration and task (with ``slot_adapters``)."""

    name: str
    config: RunConfig
    task: Task | None = None
    #: ``{step: file}``: the adapter saved as it is after each of those steps (the benchmarks' ``--eval_steps``)
    snapshots: dict[int, Path] = field(default_factory=dict)

    def identity(self) -> dict:
        return {"name": self.name, "output_dir": str(self.config.output_dir), **_json_ready(self.config.identity())}


@dataclass
class PackResult:
    """What a packed run trained: each job's result (finished in this process), the jobs stopped for diverging."""

    results: dict[str, TrainResult] = field(default_factory=dict)
    diverged: dict[str, str] = field(default_factory=dict)  # job -> what happened
    skipped: list[str] = field(default_factory=list)  # finished before this (resumed) run started
    pack_steps: int = 0
    seconds: float = 0.0
    pack: int = 1
    stopped: bool = False  # a callback's ``should_stop()`` ended the run early; resume continues it

    def report(self) -> str:
        lines = [f"packed run: {len(self.results)} jobs trained ({self.pack} at a time) in {self.pack_steps} packed "
                 f"steps, {self.seconds:.0f} s"]  # fmt: skip
        for name, result in self.results.items():
            lines.append(f"  {name:<20} {result.global_step} steps -> {result.adapter_path}")
        for name, why in self.diverged.items():
            lines.append(f"  {name:<20} STOPPED: {why}")
        if self.skipped:
            lines.append(f"  already finished before this run: {', '.join(self.skipped)}")
        if self.stopped:
            lines.append("  stopped before every job finished: resume the pack to continue")
        return "\n".join(lines)


class _OwnJobs:
    """A process's accelerate state as each of its jobs sees it: their only process (it writes their folders and
    waits for nobody), on the process's device."""

    is_main_process = is_local_main_process = True
    process_index = 0
    num_processes = 1
    trackers: list = []

    def __init__(self, state):
        self.state = state

    @property
    def device(self) -> torch.device:
        return self.state.device

    def wait_for_everyone(self) -> None:
        return None

    def print(self, *args, **kwargs) -> None:
        print(*args, **kwargs)


class SlotData:
    """A run's batches in the order its solo data loader yields them: epochs of ``EpochShuffleSampler`` permutations
    cut into batches (the last partial one kept unless the task drops it); the position is saved with checkpoints."""

    def __init__(self, dataset, batch_size: int, drop_last: bool, seed: int):
        self.dataset, self.batch_size = dataset, batch_size
        self.drop_last = drop_last and len(dataset) >= batch_size
        self.sampler = EpochShuffleSampler(len(dataset), seed=seed)
        self.epoch, self.index = 0, 0  # the next batch: batch ``index`` of epoch ``epoch``
        self._order: tuple[int, list[int]] | None = None

    @property
    def batches_per_epoch(self) -> int:
        size = len(self.dataset)
        return max(1, size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size))

    def next(self) -> dict:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self._order is None or self._order[0] != self.epoch:
            self.sampler.set_epoch(self.epoch)
            self.dataset.set_epoch(self.epoch)
            self._order = (self.epoch, list(self.sampler))
        chunk = self._order[1][self.index * self.batch_size : (self.index + 1) * self.batch_size]
        self.index += 1
        return self.dataset.collate([self.dataset[i] for i in chunk])


@dataclass
class Slot:
    """A job training in slot ``index`` (adapter ``pack<index>``)."""

    index: int
    job: Job
    trainer: Trainer
    state: LoopState
    data: SlotData
    generator: torch.Generator
    seconds: float = 0.0  # training time spent on it (its share of each packed step)

    @property
    def task(self) -> Task:
        return self.trainer.task

    @property
    def config(self) -> RunConfig:
        return self.job.config


class _AskPack(Callback):
    """A slot's trainer asks the pack whether to stop (its previews' and final samples' denoising steps)."""

    def __init__(self, should_stop):
        self._ask = should_stop

    def should_stop(self) -> bool:
        return self._ask()


def slot_name(index: int) -> str:
    return f"pack{index}"


class PackedTrainer:
    """Train ``jobs`` ``pack`` at a time (``pack`` slots per step). ``state_dir`` holds the packed run's checkpoints;
    ``resume`` continues from its latest. ``callbacks``: objects with any of

        on_job_start(name)              a job takes a slot (its class images are drawn next)
        on_job_step(name, step, logs)   a job stepped (``logs``: its ``loss`` and ``lr``)
        on_pack_step(step, slots)       after each packed step: ``{slot: (job, its step)}``
        on_job_end(name, result)        a job finished and wrote its folder
        should_stop()                   asked after every packed step and between the denoising steps of class
                                        images and previews: True checkpoints every slot where it is and ends
                                        the run (``PackResult.stopped``); ``resume`` continues it exactly"""

    def __init__(self, jobs: list[Job], pack: int, state_dir: str | Path, resume: bool = False, callbacks=(),
                 quiet: bool = False):  # fmt: skip
        if pack < 1:
            raise ConfigError(f"--pack must be at least 1, not {pack}")
        self.jobs, self.pack, self.state_dir, self.resume = list(jobs), int(pack), Path(state_dir), resume
        self.callbacks, self.quiet = list(callbacks), quiet

    # --- the run -------------------------------------------------------------------------------------------------
    def train(self) -> PackResult:
        from accelerate import PartialState

        has_accelerator = torch.cuda.is_available() or torch.backends.mps.is_available()
        process = PartialState(cpu=not has_accelerator)
        mine = self.jobs[process.process_index :: process.num_processes]
        groups: dict[str, list[Job]] = {}
        for job in mine:
            groups.setdefault(pack_key(job.config), []).append(job)
        result = PackResult(pack=self.pack)
        start = time.time()
        folder = self.state_dir / f"process-{process.process_index}-of-{process.num_processes}"
        with interruptible(self._should_stop):
            for number, group in enumerate(groups.values()):
                self._train_group(process, folder / f"pack-{number}", group, result)
                if result.stopped:
                    break
        result.seconds = time.time() - start
        if not self.quiet:
            print(result.report(), flush=True)
        process.wait_for_everyone()
        return result

    def _train_group(self, process, folder: Path, jobs: list[Job], result: PackResult) -> None:
        if self.resume and (folder / FINISHED).is_file():
            result.skipped += [job.name for job in jobs]
            return
        if not self.resume and folder.exists():  # a new run: an earlier run's pack state is not this run's
            shutil.rmtree(folder)
        first = jobs[0].config
        run = Run(_OwnJobs(process), DTYPES.get(first.mixed_precision or "no", torch.float32), None)
        backend = jobs[0].task.backend
        backend.load(run, "packed DreamBooth training")
        self.run, self.components = run, backend.components
        for job in jobs:  # --resolution defaults to the model's native size, as a solo run's does when it loads
            if job.config.resolution is None:
                job.config.resolution = self.components.native_resolution
        self.models: dict[str, torch.nn.Module] = {}
        self.route = SlotRoute([])
        self.routed = False
        # shared by the group (not in PER_JOB): every run keeps its own latent cache / prompt table
        self.cached = bool(getattr(first, "cache_latents", False))
        self.precomputed = bool(getattr(first, "pre_compute_text_embeddings", False))
        slots: dict[int, Slot] = {}
        queue = deque(jobs)
        step = 0
        if self.resume:
            step, queue, slots = self._resume(folder, jobs, result)
        total = sum(self._planned_steps(job) for job in jobs)
        progress = Progress(total, "step", disable=self.quiet or first.quiet, every=first.progress_steps)
        done = sum(slot.state.step for slot in slots.values())
        interval = min(job.config.checkpointing_steps for job in jobs)
        while True:
            try:
                for index in range(self.pack):  # free slots take the next jobs waiting
                    if index not in slots and queue:
                        slots[index] = self._start(index, queue[0])
                        queue.popleft()
            except SamplingInterrupted:  # stopped while a job's class images were drawn: it waits in the queue
                result.stopped = True
            if result.stopped or (slots and self._should_stop()):
                result.stopped = True
                progress.close()
                if step or slots or result.results:
                    self._checkpoint(folder, step, slots, queue, result, jobs)
                self._release(jobs)
                return
            if not slots:
                break
            began = time.time()
            finite = self._step(slots)
            share = (time.time() - began) / len(slots)
            step += 1
            for index in sorted(slots):
                slot = slots[index]
                slot.seconds += share
                if not finite[index]:
                    result.diverged[slot.job.name] = self._diverged(slot)
                    del slots[index]
                    continue
                done += 1
                logs = {"loss": slot.trainer.result.losses[-1], "lr": slot.state.lr_scheduler.get_last_lr()[0]}
                self._emit("on_job_step", slot.job.name, slot.state.step, logs)
                if self._after_step(slot):
                    try:
                        result.results[slot.job.name] = self._finish(slot)
                    except TrainingDivergedError as err:  # finite losses, yet vectors that are not: nothing saved
                        print(f"job {slot.job.name}: STOPPED, {err}", flush=True)
                        result.diverged[slot.job.name] = str(err)
                    del slots[index]
            progress.update(min(done, total), slots=len(slots), waiting=len(queue))
            self._emit("on_pack_step", step, {i: (s.job.name, s.state.step) for i, s in slots.items()})
            if step % interval == 0 and slots:
                with progress.paused():
                    self._checkpoint(folder, step, slots, queue, result, jobs)
        progress.close()
        result.pack_steps += step
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / FINISHED, json.dumps({"jobs": [job.name for job in jobs], "pack_steps": step}))
        self._release(jobs)

    def _release(self, jobs: list[Job]) -> None:
        """The next pack loads its own model: let this one go."""
        self._unroute()
        for job in jobs:
            job.task.backend.components = None
        self.models, self.components, self.run = {}, None, None
        gc.collect()

    def _emit(self, event: str, *args) -> None:
        for callback in self.callbacks:
            if hasattr(callback, event):
                getattr(callback, event)(*args)

    def _should_stop(self) -> bool:
        return any(callback.should_stop() for callback in self.callbacks if hasattr(callback, "should_stop"))

    def _planned_steps(self, job: Job) -> int:
        """The job's steps (for the progress line; epochs of its instance images where it gives no step count)."""
        config = job.config
        images = len(getattr(job.task, "instance_images", ())) * getattr(config, "repeats", 1)
        return config.max_train_steps or config.num_train_epochs * max(1, math.ceil(images / config.train_batch_size))

    # --- slots -----------------------------------------------------------------------------------------------------
    def _start(self, index: int, job: Job, announce: bool = True) -> Slot:
        """Put ``job`` in slot ``index``: its adapter (drawn from its seed, as alone), optimizer, schedule, data
        (class images drawn here), generator, and its step-0 baseline when it asks for previews."""
        task, config, run = job.task, job.config, self.run
        if announce:
            self._emit("on_job_start", job.name)
        name = task.adapters.name = slot_name(index)
        task.backend.components = self.components
        configs = task.adapter_configs()
        self._unroute()
        self.route.plan = None  # the slot's adapter is made anew: the plan holds its old vectors
        for model in self.models.values():
            if name in adapter_names(model):
                delete_adapter(model, name)
        if not self.models:  # the first slot: the adapters, the model on its device and dtype, the memory savers
            task.backend.attach(task.adapters, configs, run)
            self.models = dict(task.adapters.models)
        else:
            task.adapters.add({c: self.models[c] for c in configs}, configs)
        task.params = task.adapters.parameters()
        task.setup_slot(run)  # its own modules besides the adapters (control: its condition encoder)
        trainer = Trainer(task, [_AskPack(self._should_stop)])  # its previews and samples stop with the pack
        trainer.writer = True
        output_dir = Path(config.output_dir)
        check_output_dir(output_dir)
        trainer.result = TrainResult(None, output_dir, 0, False, 0.0, sum(p.numel() for p in task.params),
                                     mixed_precision=config.mixed_precision or "no")  # fmt: skip
        if config.push_to_hub:
            trainer.hub_repo = create_repository(config.hub_model_id, output_dir, config.hub_token)
        generator = torch.Generator(device=run.device).manual_seed(config.seed)
        slot_run = Run(run.accelerator, run.weight_dtype, generator)
        if self.precomputed:  # the previous run's table moved the shared text encoders off the accelerator
            for encoder in task.backend.all_text_encoders():
                encoder.to(run.device)
        dataset = task.dataset(slot_run, lambda *args: None)
        data = SlotData(dataset, config.train_batch_size, task.drop_last, config.seed)
        state = LoopState(slot_run, output_dir, dataset)
        state.groups = task.parameter_groups()
        state.params = [p for group in state.groups for p in group["params"]]
        if config.scale_lr:
            for group in state.groups:
                group["lr"] *= config.train_batch_size
        state.updates_per_epoch = data.batches_per_epoch
        state.max_train_steps = config.max_train_steps or config.num_train_epochs * data.batches_per_epoch
        state.optimizer = build_optimizer(config, state.groups)
        state.lr_scheduler = build_schedule(config, state.optimizer, state.max_train_steps)
        slot = Slot(index, job, trainer, state, data, generator)
        if announce and not self.quiet:
            print(f"job {job.name}: slot {index}, {state.max_train_steps} steps -> {output_dir}", flush=True)
        if announce and task.wants_validation() and config.validation_steps:
            self._sample(slot, SampleKind.BASELINE)
        return slot

    def _route(self, slots: dict[int, Slot]) -> None:
        """Every adapted layer routes the next batch's samples to their slots (in slot order)."""
        self.route.names = [slot_name(i) for i in sorted(slots)]
        if not self.routed:
            check_same_layout(self.models, self.route.names)
            for model in self.models.values():
                for _, layer in adapter_layers(model):
                    layer.route_slots(self.route)
            self.routed = True
        if self.route.plan is None or self.route.plan.names != self.route.names:
            layers = [layer for model in self.models.values() for _, layer in adapter_layers(model)]
            self.route.plan = SlotPlan(layers, self.route.names)

    def _activate(self, name: str) -> None:
        for model in self.models.values():
            if active_adapters(model) != [name]:
                set_active_adapters(model, [name])

    def _unroute(self) -> None:
        if self.routed:
            for model in self.models.values():
                for _, layer in adapter_layers(model):
                    layer.route_slots(None)
            self.routed = False

    def _step(self, slots: dict[int, Slot]) -> dict[int, bool]:
        """One packed step: every slot's next batch through one forward and backward, then each slot's own
        clipping, optimizer and schedule. Returns which slots' losses were finite (the others did not step)."""
        order = sorted(slots)
        batches = [slots[i].data.next() for i in order]
        counts = [len(batch["pixel_values"]) for batch in batches]
        merged = {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}
        backend, run = slots[order[0]].task.backend, self.run
        if self.cached:  # each run's own latent cache (--cache_latents): its rows looked up or encoded
            rows = [slots[i].task.backend.latent_distribution(batch, run) for i, batch in zip(order, batches)]
            distribution = type(rows[0])(torch.cat([row.parameters for row in rows]))
        else:  # one VAE pass for every run's images
            distribution = backend.latent_distribution(merged, run)
        parameters = distribution.parameters
        draws, start = [], 0
        for i, count in zip(order, counts):
            slot = slots[i]
            rows = type(distribution)(parameters[start : start + count])
            offset = 0.1 if getattr(slot.config, "offset_noise", False) else 0.0
            draws.append(slot.task.backend.draw(rows, slot.generator, run, offset))
            start += count
        joined = Draws(*(torch.cat(parts) for parts in zip(*draws)))
        if len(slots) == 1:  # one run: its solo path (one adapter active), the very computation of a run alone
            self._unroute()
            self._activate(slot_name(order[0]))
        else:
            self._route(slots)
            self.route.assign(counts, run.device)
            self.route.plan.prepare()  # every layer's slot rows in one batch per vector shape
        extra = [slots[i].task.extra_condition(batch, run) for i, batch in zip(order, batches)]
        shared = slots[order[0]].task  # the model is every slot's: any task sets what it adds
        shared.set_extra_condition(None if extra[0] is None else torch.cat(extra))  # control: each run's encoder
        try:
            with run.autocast():
                if self.precomputed:  # each run's own table of its prompts (--pre_compute_text_embeddings)
                    condition = _joined([slots[i].task.backend.condition(b, run) for i, b in zip(order, batches)])
                else:  # one text-encoder pass for every run's prompts
                    condition = backend.condition(merged, run)
                prediction = backend.denoise(joined, condition, run)
        finally:
            shared.set_extra_condition(None)
        losses, parts, start = [], [], 0
        for i, count, drawn in zip(order, counts, draws):
            config = slots[i].config
            loss, logged = slots[i].task.backend.score(
                prediction[start : start + count], drawn, config.snr_gamma,
                getattr(config, "with_prior_preservation", False), getattr(config, "prior_loss_weight", 1.0),
            )  # fmt: skip
            losses.append(loss)
            parts.append(logged)
            start += count
        values = torch.stack([logged["loss"] for logged in parts]).tolist()  # the step's one wait for the device
        finite = [math.isfinite(value) for value in values]
        total = sum(loss for loss, ok in zip(losses, finite) if ok)
        if isinstance(total, torch.Tensor):
            total.backward()
        for i, ok, value in zip(order, finite, values):
            state = slots[i].state
            if ok:
                if slots[i].config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(state.params, slots[i].config.max_grad_norm)
                state.optimizer.step()
                state.lr_scheduler.step()
                state.step += 1
                slots[i].trainer.result.losses.append(value)
            state.optimizer.zero_grad(set_to_none=True)
        return dict(zip(order, finite))

    def _after_step(self, slot: Slot) -> bool:
        """Previews when due; True when the slot has trained its steps."""
        state = slot.state
        snapshot = slot.job.snapshots.get(state.step)
        if snapshot is not None:  # written atomically; non-finite vectors raise (the loss was finite: rare)
            Path(snapshot).parent.mkdir(parents=True, exist_ok=True)
            slot.task.save(Path(snapshot))
        if slot.trainer.validation_due(state):
            try:
                self._sample(slot, SampleKind.PREVIEW)
            except SamplingInterrupted:  # a stop during a preview: the step stands, the run stops after it
                pass
        return state.step >= state.max_train_steps

    def _sample(self, slot: Slot, kind: SampleKind) -> None:
        """``kind``'s samples of the slot's run: its adapter alone (or none, for the baseline)."""
        self._unroute()
        self._activate(slot_name(slot.index))
        slot.task.make_current()
        slot.trainer.validate(slot.state, kind)

    def _finish(self, slot: Slot) -> TrainResult:
        """What the job's solo run writes, in its folder."""
        self._unroute()
        trainer, state = slot.trainer, slot.state
        self._activate(slot_name(slot.index))
        trainer.result.global_step = state.step
        trainer.result.train_seconds = slot.seconds
        trainer.save_outputs(state)
        self._emit("on_job_end", slot.job.name, trainer.result)
        return trainer.result

    def _diverged(self, slot: Slot) -> str:
        why = (f"the loss became non-finite at step {slot.state.step + 1}; nothing was written for it. Lower its "
               f"learning_rate ({slot.config.learning_rate:g}) and train it again")  # fmt: skip
        print(f"job {slot.job.name}: STOPPED, {why}", flush=True)
        return why

    # --- checkpoints ---------------------------------------------------------------------------------------------
    def _checkpoint(self, folder: Path, step: int, slots: dict[int, Slot], queue, result: PackResult,
                    jobs: list[Job]) -> Path:  # fmt: skip
        """Every slot's state and the queue, in a folder that is complete or absent (``checkpoints.py``)."""
        final, partial = partial_folder(folder, step)
        shutil.rmtree(partial, ignore_errors=True)
        try:
            partial.mkdir(parents=True)
            record = {
                "pack_step": step,
                "jobs": [job.identity() for job in jobs],
                "queue": [job.name for job in queue],
                "finished": list(result.results),
                "diverged": result.diverged,
                "slots": {},
            }
            for index, slot in slots.items():
                slot.task.save(partial / f"slot-{index}.safetensors")
                torch.save(
                    {
                        "optimizer": slot.state.optimizer.state_dict(),
                        "schedule": slot.state.lr_scheduler.state_dict(),
                        "generator": slot.generator.get_state(),
                        "losses": slot.trainer.result.losses,
                    },
                    partial / f"slot-{index}.pt",
                )
                record["slots"][str(index)] = {"job": slot.job.name, "step": slot.state.step, "epoch": slot.data.epoch,
                                               "batch": slot.data.index, "seconds": slot.seconds}  # fmt: skip
            (partial / STATE_RECORD).write_text(json.dumps(record, indent=1))
            (partial / COMPLETE_MARKER).write_text(str(step))
        except (OSError, RuntimeError) as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise write_failed(folder, step, err) from err
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        prune_checkpoints(folder, min(job.config.checkpoints_total_limit or 2**31 for job in jobs))
        return final

    def _resume(self, folder: Path, jobs: list[Job], result: PackResult):
        """``(pack step, queue, slots)`` of the latest checkpoint in ``folder`` (a fresh start when none)."""
        checkpoint = latest_checkpoint(folder)
        if checkpoint is None:
            if not self.quiet:
                print(f"no pack checkpoint in '{folder}': starting the pack from the beginning", flush=True)
            return 0, deque(jobs), {}
        try:
            record = json.loads((checkpoint / STATE_RECORD).read_text())
        except (OSError, ValueError) as err:
            raise ResumeMismatchError(f"'{checkpoint / STATE_RECORD}' is unreadable ({err})") from err
        recorded = {job["name"]: job for job in record.get("jobs", [])}
        for job in jobs:
            before = recorded.get(job.name)
            if before is None or before != job.identity():
                differ = sorted(k for k in {**(before or {}), **job.identity()}
                                if (before or {}).get(k) != job.identity().get(k))[:6]  # fmt: skip
                raise ResumeMismatchError(
                    f"job '{job.name}' is not the job the pack checkpoint '{checkpoint}' trained ("
                    + (f"settings differ: {', '.join(differ)}" if before else "not in it")
                    + "); resume with the "
                    "jobs file it was started with, or start the pack in a new output folder"
                )
        if len(recorded) != len(jobs):
            raise ResumeMismatchError(
                f"the pack checkpoint '{checkpoint}' trained {len(recorded)} jobs in this process, the jobs file now "
                f"gives {len(jobs)}; resume with the jobs file (and the number of processes) it was started with"
            )
        by_name = {job.name: job for job in jobs}
        result.skipped += [name for name in record["finished"]]
        result.diverged.update(record.get("diverged", {}))
        if not self.quiet:
            print(f"resuming the pack from {checkpoint}", flush=True)
        slots = {}
        for key, saved in sorted(record["slots"].items(), key=lambda item: int(item[0])):
            index = int(key)
            slot = self._start(index, by_name[saved["job"]], announce=False)
            slot.task.load_checkpoint(checkpoint / f"slot-{index}.safetensors")
            tensors = torch.load(checkpoint / f"slot-{index}.pt", weights_only=True)
            slot.state.optimizer.load_state_dict(tensors["optimizer"])
            slot.state.lr_scheduler.load_state_dict(tensors["schedule"])
            slot.generator.set_state(tensors["generator"])
            slot.trainer.result.losses = list(tensors["losses"])
            slot.state.step, slot.data.epoch, slot.data.index = saved["step"], saved["epoch"], saved["batch"]
            slot.seconds = saved.get("seconds", 0.0)
            slots[index] = slot
        return record["pack_step"], deque(by_name[name] for name in record["queue"]), slots


def _joined(conditions: list[dict]) -> dict:
    """The runs' conditioning keyword arguments concatenated along the batch (nested dicts too: SDXL's)."""
    first = conditions[0]
    return {key: _joined([c[key] for c in conditions]) if isinstance(first[key], dict)
            else torch.cat([c[key] for c in conditions]) for key in first}  # fmt: skip
