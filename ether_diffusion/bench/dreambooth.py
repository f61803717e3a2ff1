"""The paper's subject-driven benchmark (Table 2 of the ETHER paper) on any DreamBooth-layout dataset:

    ether-diffusion bench dreambooth --dataset dreambooth/dataset --model stable-diffusion-v1-5/stable-diffusion-v1-5
    ether-diffusion bench export-world --output outputs/tiny-dreambooth      # the tiny world in that layout, then
    ether-diffusion bench dreambooth --dataset outputs/tiny-dreambooth       # offline, scored by the world evaluator

For every subject × method × learning-rate scale × seed it trains on the library's DreamBooth task and loop (what
``ether-diffusion train`` runs; LoRA and OFT are PEFT peers on that same loop) with prior preservation on class
images drawn once per class, reloads the saved file, samples K images per prompt from fixed seeds, and scores them
(DINO, CLIP-I, CLIP-T; or the world evaluator's stand-ins). The base model is sampled and scored the same way, and
the real images against each other give the ceiling. It writes ``dreambooth.json`` (every run), ``dreambooth.md``
(mean ± sd over subjects) and ``dreambooth.png``, after every run; a rerun of the same command resumes (``runs``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..training.class_images import ensure_class_images
from ..training.config import ConfigError, RunConfig, TaskKind, option
from ..training.data import load_image_folder
from ..training.dreambooth import DreamBoothConfig
from ..training.pack import DEFAULT_PACK
from .config import DREAMBOOTH_METHODS, BenchOptions, hidden, is_tiny_model, shipped_model_named
from .dataset import DEFAULT_IDENTIFIER, LIVE_CLASSES, BenchSubject, SubjectDataset, load_subject_dataset
from .metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, DinoClipMetrics, SubjectMetrics, WorldMetrics
from .report import (
    curve_summary,
    machine,
    mean_sd,
    sample_grid,
    shown_runs,
    summarise,
    write_curves,
    write_result,
)
from .runner import BenchRunner
from .runs import SnapshotMissing, missing_snapshots
from .sampling import BasePipeline, adapted_modules, image_files, save_image, swapped

__all__ = ["main", "parse_args", "DreamBoothBenchConfig", "run_dreambooth_bench"]

# (the paper's protocol on a real model, the tiny world's on the shipped one)
DEFAULTS = {
    "max_train_steps": (1400, 600),
    "num_class_images": (200, 50),
    "inference_steps": (50, 25),
    "guidance_scale": (7.5, 5.0),
    "images_per_prompt": (4, 2),
    "metrics": ("dino-clip", "world"),
    "scheduler": ("ddim", "ddim"),
}
QUICK = {"max_train_steps": 2, "num_class_images": 2, "inference_steps": 2, "images_per_prompt": 2, "num_prompts": 2}


@dataclass(kw_only=True)
class DreamBoothBenchConfig(BenchOptions, DreamBoothConfig):
    task_name = "bench dreambooth"
    description = (
        "The DreamBooth benchmark (the ETHER paper's Table 2): train every subject × method × seed on a "
        "DreamBooth-layout dataset, sample its prompts, score DINO / CLIP-I / CLIP-T (or the tiny world's "
        "evaluator), resume where a previous run stopped. Every training flag applies to every run."
    )

    dataset: str = option(help="a DreamBooth-layout folder (google/dreambooth's dataset/, or `bench export-world`)",
                          same_run=False)  # fmt: skip
    subjects: list[str] | None = option(None, "subjects to run (default: all)", same_run=False)
    live_classes: list[str] | None = option(None, "class nouns of live subjects (default: cat dog)")
    identifier: str = option(DEFAULT_IDENTIFIER, "the subject's identifier token")
    num_prompts: int | None = option(None, "evaluate the first N prompt templates (default: all 25)", minimum=1)
    metrics: str | None = option(None, "dino-clip (the field's) or world (the tiny world's evaluator; default "
                                 "for the shipped model)", choices=("dino-clip", "world"))  # fmt: skip
    dino_model: str = option(DEFAULT_DINO_MODEL, "DINO ViT (hub id or local folder)")
    clip_model: str = option(DEFAULT_CLIP_MODEL, "CLIP model (hub id or local folder)")
    no_prior_preservation: bool = option(False, "train without class images (the paper uses them)")
    pack: int = option(
        DEFAULT_PACK, "train this many ETHER runs of a subject side by side in each step (`train --jobs`; each run "
        "trains what it trains alone, to float32 rounding); 1: one at a time. PEFT peers train one at a time",
        minimum=1, same_run=False,
    )  # fmt: skip
    eval_steps: list[int] | None = option(
        None, "also evaluate the adapter as it was after each of these steps of every run (saved while it trains: "
        "points of the trade-off curves at no extra training); the last step is always evaluated",
    )  # fmt: skip

    # shared flags with the benchmark's defaults
    target_modules: tuple[str, ...] = option(
        ("unet-attention",), "presets and/or module-path suffixes, for every method (default: the paper's "
        "q/k/v/out of every attention; `ether-diffusion train` defaults to unet-attention-image)",
    )  # fmt: skip
    pretrained_model_name_or_path: str | None = option(
        None, "diffusers folder, hub id or single checkpoint file (default: the shipped tiny model)", flag="model"
    )
    output_dir: str = option("outputs/bench-dreambooth", "where runs, class images and the table go",
                             same_run=False)  # fmt: skip
    max_train_steps: int | None = option(None, "steps per run (default: 1400, the paper's; 600 on the tiny model)",
                                         minimum=1)  # fmt: skip
    num_class_images: int | None = option(None, "class images per class (default: 200, the paper's; 50 tiny)",
                                          minimum=1)  # fmt: skip
    report_to: str = option("none", "tensorboard, wandb, all or none (per run)", same_run=False)

    # set per run by the benchmark
    instance_data_dir: str = hidden("")
    instance_prompt: str = hidden("")
    caption_extension: str = hidden(".txt")  # the benchmark's subjects come from --dataset
    dataset_name: str | None = hidden()
    dataset_config_name: str | None = hidden()
    cache_dir: str | None = hidden()
    image_column: str = hidden("image")
    caption_column: str | None = hidden()
    push_to_hub: bool = hidden(False)  # runs are measurements, not models to publish
    hub_model_id: str | None = hidden()
    hub_token: str | None = hidden()
    validation_scheduler: str = hidden("DPMSolverMultistepScheduler")
    class_data_dir: str | None = hidden()
    class_prompt: str | None = hidden()
    with_prior_preservation: bool = hidden(True)
    prior_generation_precision: str | None = hidden()
    sample_batch_size: int = hidden(4)  # class images are drawn --sample_batch at a time
    ether_method: str = hidden("ether_plus")
    learning_rate: float = hidden(6e-3)
    seed: int = hidden(0)
    resume_from_checkpoint: str | None = hidden()
    validation_prompt: str | None = hidden()
    validation_steps: int | None = hidden()
    validation_epochs: int | None = hidden()
    num_validation_images: int = hidden(4)
    validation_inference_steps: int = hidden(25)  # evaluation uses --inference_steps
    validation_guidance_scale: float = hidden(7.5)  # and --guidance_scale
    no_final_reload: bool = hidden(True)
    num_train_epochs: int = hidden(1)  # runs are --max_train_steps long
    local_rank: int = hidden(-1)  # one process (several: one per GPU on other --subjects, into one folder)

    def validate(self):
        if self.quick:
            for key, value in QUICK.items():
                setattr(self, key, value)
        RunConfig.validate(self)  # the shared checks (ranges, finiteness, model, adapter); per-run ones below
        tiny = is_tiny_model(self.pretrained_model_name_or_path)
        for key, (paper, world) in DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, world if tiny else paper)
        self.live_classes = list(self.live_classes or LIVE_CLASSES)
        self.check_eval_steps()
        if not self.identifier.strip() or len(self.identifier.split()) != 1:
            raise ConfigError(f"--identifier must be one word, not {self.identifier!r}")
        self.check_grid(DREAMBOOTH_METHODS)
        for method in self.methods:  # every training flag, checked once per method before anything runs
            probe = BenchSubject("subject", "thing", False, Path("."), ())
            self.run_config(probe, method, 1.0, 0, Path(".")).validate()
        return self

    def check_eval_steps(self) -> None:
        """``--eval_steps``: distinct steps before the last one (which is always evaluated), kept in ascending order;
        none given is None (what a folder made before the flag existed recorded)."""
        steps = self.eval_steps
        if not steps:
            self.eval_steps = None
            return
        last = self.max_train_steps
        bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < last]
        if bad or len(set(steps)) != len(steps):
            what = f"{bad} not whole steps before the last one ({last})" if bad else "a step is given twice"
            raise ConfigError(
                f"--eval_steps {' '.join(map(str, steps))}: {what}. Give distinct steps before --max_train_steps "
                f"({last}); the last step is always evaluated"
            )
        self.eval_steps = sorted(steps)

    def run_config(self, subject: BenchSubject, method: str, scale: float, seed: int, run_dir: Path,
                   class_dir: Path | None = None) -> DreamBoothConfig:  # fmt: skip
        """The DreamBooth configuration of one run: every shared flag, plus what the benchmark sets."""
        return self.one_run(
            DreamBoothConfig, DREAMBOOTH_METHODS, method, scale, seed, run_dir,
            instance_data_dir=str(subject.folder),
            instance_prompt=subject.instance_prompt(self.identifier),
            class_prompt=subject.class_prompt,
            class_data_dir=None if class_dir is None else str(class_dir),
            with_prior_preservation=not self.no_prior_preservation,
        )  # fmt: skip

    def settings(self) -> dict:
        """What every run shares (the benchmark's identity: a resume must match it); the fields set per run and
        the grid are not part of it."""
        identity = shipped_model_named(self.identity())
        if identity.get("metrics") != "dino-clip":
            identity.pop("dino_model", None)
            identity.pop("clip_model", None)
        return identity


def subject_metrics(config: DreamBoothBenchConfig, device) -> SubjectMetrics:
    if config.metrics == "world":
        return WorldMetrics()
    return DinoClipMetrics(config.dino_model, config.clip_model, device)


class DreamBoothBench(BenchRunner):
    """One invocation on a DreamBooth-layout dataset: a group per subject, scored by ``SubjectMetrics``."""

    kind = TaskKind.DREAMBOOTH
    methods = DREAMBOOTH_METHODS
    record_fields = {"subject": ("text",), "class_noun": ("text",)}
    base_fields = {"ceiling": ("scores",)}  # the real images against each other

    def __init__(self, config: DreamBoothBenchConfig, callbacks, command: str | None, log, metrics=None):
        super().__init__(config, callbacks, command, log)
        self.data: SubjectDataset = load_subject_dataset(config.dataset, config.live_classes)
        self.subjects = self.data.select(config.subjects)
        for subject in self.subjects:  # every image decodes, before any model loads (kept one subject at a time)
            load_image_folder(subject.folder, f"subject '{subject.name}'")
        self._real: tuple[str, list] | None = None
        self.base = BasePipeline(config)
        self.metrics = metrics if metrics is not None else subject_metrics(config, self.base.device)
        keys = [m.key for m in self.metrics.metrics]
        for axis in ("subject_metric", "prompt_metric"):
            if getattr(self.metrics, axis) not in (None, *keys):
                raise ValueError(f"{type(self.metrics).__name__}.{axis} {getattr(self.metrics, axis)!r} is not one of "
                                 f"its metrics ({', '.join(keys)})")  # fmt: skip
        self.open_store({**config.settings(), "dataset": self.data.fingerprint(), **self.metrics.identity()})

    # --- one subject ------------------------------------------------------------------------------------------
    def groups(self) -> list[BenchSubject]:
        return self.subjects

    def group_name(self, subject: BenchSubject) -> str:
        return subject.name

    def group_fields(self, subject: BenchSubject) -> dict:
        return dict(subject=subject.name, class_noun=subject.class_noun)

    def log_prefix(self, subject: BenchSubject) -> str:
        return f"{subject.name:<24} "

    def real(self, subject: BenchSubject) -> list:
        """The subject's dataset images (the last subject's are kept: 30 subjects of photos would fill memory)."""
        if self._real is None or self._real[0] != subject.name:
            self._real = (subject.name, load_image_folder(subject.folder, f"subject '{subject.name}'"))
        return self._real[1]

    def prompts(self, subject: BenchSubject):
        return self.data.prompts(subject, self.config.identifier, self.config.num_prompts)

    def seeds(self) -> list[int]:
        return [self.config.eval_seed + k for k in range(self.config.images_per_prompt)]

    def sample(self, pipe, subject: BenchSubject, folder: Path) -> list:
        """K images per prompt into ``folder`` (only the missing ones are drawn, ``sample_batch`` at a time; image k
        of every prompt from seed ``eval_seed + k``), then all of them, read back."""
        config = self.config
        folder.mkdir(parents=True, exist_ok=True)
        wanted = [(prompt.text, seed, folder / f"{index:02d}-seed{seed}.png")
                  for index, prompt in enumerate(self.prompts(subject)) for seed in self.seeds()]  # fmt: skip
        missing = [item for item in wanted if not item[2].is_file()]
        for start in range(0, len(missing), config.sample_batch):
            chunk = missing[start : start + config.sample_batch]
            images = pipe([text for text, _, _ in chunk], generator=[torch.Generator().manual_seed(seed)
                          for _, seed, _ in chunk], num_inference_steps=config.inference_steps,
                          guidance_scale=config.guidance_scale).images  # fmt: skip
            for (_, _, path), image in zip(chunk, images):
                save_image(image, path)
        return image_files([path for _, _, path in wanted])

    def texts(self, subject: BenchSubject) -> list[str]:
        return [p.class_text for p in self.prompts(subject) for _ in self.seeds()]

    def score(self, images: list, subject: BenchSubject) -> dict:
        return self.metrics.score(images, self.texts(subject), self.real(subject))

    def base_record(self, subject: BenchSubject) -> dict:
        images = self.sample(self.base.pipe, subject, self.store.run_dir(subject.name, "base") / "samples")
        return dict(
            **self.group_fields(subject), method="base", label="base model (no adapter)", lr=None, lr_scale=None,
            seed=None, parameters=0, diverged=False, images=len(images), metrics=self.score(images, subject),
            ceiling=self.metrics.real_ceiling(self.real(subject)),
        )  # fmt: skip

    # --- one run ----------------------------------------------------------------------------------------------
    def class_dir(self, subject: BenchSubject) -> Path | None:
        """Class images are drawn once per class by the base model, shared by subjects and methods."""
        return None if self.config.no_prior_preservation else self.store.class_dir(subject.class_noun)

    def run_config(self, subject: BenchSubject, method: str, scale: float, seed: int, run_dir: Path):
        return self.config.run_config(subject, method, scale, seed, run_dir, self.class_dir(subject))

    def before_training(self, subject: BenchSubject, run_config) -> None:
        config, class_dir = self.config, self.class_dir(subject)
        if class_dir is not None:
            ensure_class_images(lambda: self.base.pipe, subject.class_prompt, class_dir, config.num_class_images,
                                config.sample_batch, 0, config.inference_steps, config.guidance_scale,
                                show_progress=not config.quiet)  # fmt: skip

    def snapshot_paths(self, run_dir: Path, weight_name: str) -> dict[int, Path]:
        return {step: self.store.snapshot_dir(run_dir, step) / weight_name for step in self.config.eval_steps or ()}

    def evaluate(self, subject: BenchSubject, method: str, run_config, run_dir: Path, adapter: Path,
                 snapshots: dict[int, Path]) -> dict:  # fmt: skip
        """The final adapter's images and scores; with ``--eval_steps`` also each snapshot's (the run's curve)."""
        missing = missing_snapshots(snapshots, self.config.max_train_steps)
        if missing:  # the training finished without them: only a folder changed by hand gets here
            raise SnapshotMissing(
                f"{run_dir} is trained but the adapter snapshots of steps {missing} (--eval_steps) are gone; "
                f"delete {run_dir} to train the run again"
            )
        start = time.time()
        images, parameters = self.sample_adapter(method, run_config, adapter, subject, run_dir / "samples")
        final = dict(images=len(images), sample_seconds=time.time() - start, metrics=self.score(images, subject))
        record = dict(parameters=parameters, **final)
        if snapshots:  # points along the run, then the last step: the run's curve
            record["curve"] = [self.snapshot_point(method, run_config, step, path, subject)
                               for step, path in snapshots.items()]  # fmt: skip
            record["curve"].append({"step": self.config.max_train_steps, **final})
        return record

    def sample_adapter(self, method: str, run_config, adapter: Path, subject: BenchSubject,
                       folder: Path) -> tuple[list, int]:  # fmt: skip
        """The adapter file reloaded into copies of the base pipeline's modules, sampled into ``folder``: ``(images,
        trainable parameters)``."""
        modules, parameters, _ = adapted_modules(self.base.pipe, self.task(method, run_config), adapter)
        with swapped(self.base.pipe, modules) as pipe:
            images = self.sample(pipe, subject, folder)
        del modules
        return images, parameters

    def snapshot_point(self, method: str, run_config, step: int, adapter: Path, subject: BenchSubject) -> dict:
        """One point of a run's curve: its adapter after ``step`` steps, sampled (beside the file) and scored."""
        start = time.time()
        images, _ = self.sample_adapter(method, run_config, adapter, subject, adapter.parent / "samples")
        return dict(step=step, images=len(images), sample_seconds=time.time() - start,
                    metrics=self.score(images, subject))  # fmt: skip

    # --- the table ----------------------------------------------------------------------------------------
    def result(self) -> dict:
        config = self.config
        metrics = self.metrics.metrics
        records = self.store.collect()  # every finished run of this folder, also those of earlier invocations
        trained = [r for r in records if r["method"] != "base"]
        bases = [r for r in records if r["method"] == "base"]
        order = ["base", *DREAMBOOTH_METHODS]
        summary = summarise(bases + trained, metrics, order, unit="subject")
        ceilings = [r["ceiling"] for r in bases]
        references = []
        if ceilings:
            real = {m.key: [c[m.key] for c in ceilings if m.key in c] for m in metrics}
            references.append(dict(kind="ceiling", label="real images (to each other)", runs=len(ceilings),
                                   metrics={k: mean_sd(v) for k, v in real.items() if v}))  # fmt: skip
        in_table = sorted({r["subject"] for r in records})
        live = sum(self.data.subject(name).live for name in in_table)
        about = [
            f"Dataset: `{self.data.root}`, {len(in_table)} of its {len(self.data.subjects)} subjects in the table "
            f"({live} live); model `{config.settings()['pretrained_model_name_or_path']}`",
            f"Training: {config.max_train_steps} steps, batch {config.train_batch_size}, resolution "
            f"{config.resolution or 'native'}, prior preservation "
            + ("off" if config.no_prior_preservation else f"{config.num_class_images} class images × "
               f"{config.prior_loss_weight:g}")
            + f"; training seeds {sorted({r['seed'] for r in trained})}; lr scales "
            f"{sorted({r['lr_scale'] for r in trained})}"
            + (f"; evaluated after steps {[*config.eval_steps, config.max_train_steps]}" if config.eval_steps else ""),
            f"Evaluation: {f'the first {config.num_prompts}' if config.num_prompts else 'all'} prompt templates × "
            f"{config.images_per_prompt} images "
            f"(seeds {self.seeds()}), {config.scheduler} {config.inference_steps} steps, guidance "
            f"{config.guidance_scale:g}",
        ]  # fmt: skip
        tradeoff, curves = None, []
        if self.metrics.subject_metric and self.metrics.prompt_metric and trained:
            x, y = (next(m for m in metrics if m.key == k) for k in (self.metrics.subject_metric,
                                                                     self.metrics.prompt_metric))  # fmt: skip
            tradeoff = dict(x=x.key, y=y.key, x_label=x.label, y_label=y.label, figure="dreambooth_tradeoff.png",
                            table="dreambooth_curves.md", eval_steps=config.eval_steps)  # fmt: skip
            curves = curve_summary(trained, metrics, order, "subject", config.max_train_steps)
        return dict(
            kind="dreambooth",
            command=self.command,
            date=time.strftime("%Y-%m-%d"),
            machine=machine(),
            output_dir=str(config.output_dir),
            about=about,
            settings=config.settings(),
            invocation=dict(
                methods=config.methods,
                seeds=config.seeds,
                lr_scales=config.lr_scales,
                subjects=[s.name for s in self.subjects],
            ),  # fmt: skip
            dataset=dict(
                root=str(self.data.root),
                fingerprint=self.data.fingerprint(),
                subjects={
                    s.name: {"class": s.class_noun, "live": s.live, "images": len(s.image_paths)}
                    for s in self.data.subjects
                },  # fmt: skip
            ),
            metrics=[dataclasses.asdict(m) for m in metrics],
            metrics_description=self.metrics.description,
            rows=records,
            summary=summary,
            references=references,
            tradeoff=tradeoff,
            curves=curves,
        )

    def samples_figure(self, result: dict) -> None:
        """``dreambooth_samples.png``: for the first subject of the table, its real images, then the base model and
        each method (lowest seed, ×1 or its first lr scale) on the first prompts, image 0 of each."""
        records = [r for r in result["rows"] if r.get("images")]
        if not records:
            return
        subject = sorted({r["subject"] for r in records})[0]
        columns = 6
        names = [f"{i:02d}-seed{self.config.eval_seed}.png" for i in range(columns)]
        rows = [("real images", list(self.data.subject(subject).image_paths[:columns]))]
        for label, r in shown_runs([r for r in records if r["subject"] == subject], ["base", *DREAMBOOTH_METHODS]):
            samples = self.store.root / "runs" / r["run"] / "samples"
            rows.append((label, [p for p in (samples / n for n in names) if p.is_file()]))
        labels = sample_grid(rows, self.store.root / "dreambooth_samples.png")
        result["samples_figure"] = {"file": "dreambooth_samples.png", "subject": subject, "rows": labels}

    def write_report(self) -> dict:
        title = f"DreamBooth benchmark: {self.data.root.name}"
        metrics = self.metrics.metrics
        result = self.result()
        self.samples_figure(result)
        unit = "subjects (a subject's value is first averaged over its training seeds)"
        if result["tradeoff"]:
            write_curves(self.config.output_dir, "dreambooth", result, metrics, title, unit)
        return write_result(self.config.output_dir, "dreambooth", result, metrics, title, unit)


def run_dreambooth_bench(config: DreamBoothBenchConfig, callbacks=(), command: str | None = None, log=print,
                         metrics: SubjectMetrics | None = None) -> dict:  # fmt: skip
    """Validate ``config``, run (or resume) every run of its grid, and write the table; returns the result dict
    (what ``dreambooth.json`` holds). ``callbacks`` go to every run's trainer (one asking to stop interrupts the
    benchmark with ``BenchInterrupted``; rerunning resumes). ``metrics``: any ``SubjectMetrics`` instead of the one
    ``config.metrics`` names (its ``identity()`` is recorded with the folder's settings)."""
    config.validate()
    if command is None and sys.argv and sys.argv[0].endswith("ether-diffusion"):
        command = " ".join(["ether-diffusion", *sys.argv[1:]])
    return DreamBoothBench(config, callbacks, command, log, metrics).execute()


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> DreamBoothBenchConfig:
    """The benchmark's flags (every training flag of its task, plus the grid's), validated."""
    return DreamBoothBenchConfig.from_args(argv, prog)


def main(config: DreamBoothBenchConfig, command: str | None = None) -> dict:
    """Run ``config`` (``run_dreambooth_bench``) and say where the table is."""
    result = run_dreambooth_bench(config, command=command)
    folder = Path(result["output_dir"])
    print(f"table: {folder / 'dreambooth.md'} (every run: dreambooth.json, plot: dreambooth.png)")
    return result
