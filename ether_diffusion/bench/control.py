"""The paper's controllable-synthesis benchmark (Table 3 of the ETHER paper: segmentation → image) on dataset folders
in the layout of the control training script (``metadata.jsonl`` with image, conditioning_image, text):

    ether-diffusion bench control --train_data_dir ade20k/train --eval_data_dir ade20k/val --model sd-1.5 \
        --segmenter nvidia/segformer-b4-finetuned-ade-512-512
    ether-diffusion bench export-world --control segmentation --output outputs/tiny-control   # the tiny world, then
    ether-diffusion bench control --train_data_dir outputs/tiny-control/train \
        --eval_data_dir outputs/tiny-control/eval                                              # offline

For every method × learning-rate scale × seed it trains the condition encoder (+ the method's adapter) on the
library's control task and loop (what ``ether-diffusion train-control`` runs; PEFT peers on the same loop), reloads
the saved file, samples each evaluation row's control with its caption (image k of row r from seed
``eval_seed + r·K + k``), and scores mIoU and pixel accuracy of the segmenter's reading of the images against the
row's reference mask (its ``mask`` column: class ids, 255 ignored; rows without one are compared with the
segmenter's reading of their target image). With the world's segmenter it adds the evaluator's prompt fidelity
and a Fréchet distance on its embeddings (generated vs the real targets). The base model without control and the
segmenter on the real targets are the references. Writes ``control.json``, ``control.md`` (mean ± sd over seeds)
and ``control.png``; a rerun of the same command resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..control.data import ControlDataError, ControlDataset, open_control_image, write_world_control_dataset
from ..control.encoder import ConditionEncoder, ConditionEncoderConfig, attach_condition_encoder
from ..control.pipeline import ENCODER_MODULE, EtherControlPipeline
from ..control.train import ControlConfig
from ..evaluation import embed, prompt_fidelity
from ..files import atomic_folder
from ..training.config import ConfigError, RunConfig, TaskKind, option
from .config import CONTROL_METHODS, BenchOptions, hidden, is_tiny_model, shipped_model_named
from .metrics import IGNORE_INDEX, Metric, Segmenter, TransformersSegmenter, WorldSegmenter, frechet_distance
from .metrics import segmentation_scores as scores_of_masks
from .report import machine, mean_sd, sample_grid, shown_runs, summarise, write_result
from .runner import BenchRunner
from .sampling import BasePipeline, adapted_modules, image_files, save_image, swapped

__all__ = [
    "main",
    "parse_args",
    "ControlBenchConfig",
    "EvalRow",
    "export_world_control",
    "read_eval_rows",
    "run_control_bench",
]

#: ``--pack``'s default: measured (``bench pack --task control``, docs/performance.md), 1.00× / 0.95× / 1.04× / 0.99×
#: the adapters per hour at K = 1 / 2 / 4 / 8 on the 2-core CPU, with memory growing by 0.3 GB per 2 runs
CONTROL_PACK = 1
TRAIN_START, EVAL_START = 20_000_000, 30_000_000  # tiny-world scene numbers: disjoint from each other and pretraining
# (the paper's setup on a real model, the tiny world's on the shipped one)
DEFAULTS = {
    "max_train_steps": (None, 600),  # real: --num_train_epochs
    "num_train_epochs": (20, 1),  # OFT's ADE20K schedule
    "train_batch_size": (10, 8),
    "proportion_empty_prompts": (0.0, 0.1),
    "inference_steps": (50, 20),
    "guidance_scale": (9.0, 5.0),
    "scheduler": ("ddim", "dpm"),
    "images_per_prompt": (1, 1),
}
QUICK = {"max_train_steps": 2, "train_batch_size": 2, "num_eval": 4, "inference_steps": 2}


@dataclass(kw_only=True)
class ControlBenchConfig(BenchOptions, ControlConfig):
    task_name = "bench control"
    description = (
        "The controllable-synthesis benchmark (the ETHER paper's Table 3): train the condition encoder with every "
        "method × seed on a control dataset folder, sample a held-out folder's controls, score mIoU and pixel "
        "accuracy with a segmenter, resume where a previous run stopped. Every training flag applies to every run."
    )

    eval_data_dir: str = option(help="held-out folder in the same layout (metadata.jsonl), sampled and scored",
                                same_run=False)  # fmt: skip
    num_eval: int | None = option(None, "score the first N rows of --eval_data_dir (default: all)", minimum=1)
    mask_column: str = option("mask", "column of reference class masks (PNG of class ids, 255 ignored); rows "
                              "without it are compared with the segmenter's reading of their target image")  # fmt: skip
    segmenter: str | None = option(None, "world (the tiny world's; default on the shipped model) or an "
                                   "AutoModelForSemanticSegmentation hub id / folder")  # fmt: skip
    eval_seed: int = option(0, "image k of row r is drawn from seed eval_seed + r·K + k", minimum=0)
    pack: int = option(
        CONTROL_PACK, "train this many adapter runs side by side in each step (`train --jobs`; each with its own "
        "condition encoder, and trains what it trains alone, to float32 rounding). Default 1: at the benchmark's "
        "batch of 8 a run's step is bound by arithmetic, and packing 8 gained nothing on a CPU (docs/performance.md); "
        "try 8 where the step waits for the host (a GPU). The encoder-only runs and PEFT peers train one at a time",
        minimum=1, same_run=False,
    )  # fmt: skip

    # shared flags with the benchmark's defaults
    pretrained_model_name_or_path: str | None = option(
        None, "diffusers folder, hub id or single checkpoint file (default: the shipped tiny model)", flag="model"
    )
    output_dir: str = option("outputs/bench-control", "where runs and the table go", same_run=False)
    max_train_steps: int | None = option(None, "steps per run (default: 600 on the tiny model, else epochs)",
                                         minimum=1)  # fmt: skip
    num_train_epochs: int | None = option(None, "epochs when --max_train_steps is not given (default 20)", minimum=1)
    train_batch_size: int | None = option(None, "batch size (default: 10, the paper's; 8 on the tiny model)",
                                          minimum=1)  # fmt: skip
    proportion_empty_prompts: float | None = option(None, "share of captions dropped (default 0; 0.1 tiny)",
                                                    minimum=0.0)  # fmt: skip
    report_to: str = option("none", "tensorboard, wandb, all or none (per run)", same_run=False)

    # set per run by the benchmark
    no_adapters: bool = hidden(False)
    ether_method: str = hidden("ether_plus")
    learning_rate: float = hidden(1e-3)
    seed: int = hidden(0)
    push_to_hub: bool = hidden(False)  # runs are measurements, not models to publish
    hub_model_id: str | None = hidden()
    hub_token: str | None = hidden()
    validation_scheduler: str = hidden("DPMSolverMultistepScheduler")
    resume_from_checkpoint: str | None = hidden()
    validation_prompt: list[str] | None = hidden()
    validation_image: list[str] | None = hidden()
    validation_steps: int | None = hidden()
    validation_epochs: int | None = hidden()
    num_validation_images: int = hidden(2)
    validation_inference_steps: int = hidden(25)  # evaluation uses --inference_steps
    validation_guidance_scale: float = hidden(5.0)  # and --guidance_scale
    no_final_reload: bool = hidden(True)
    local_rank: int = hidden(-1)  # one process

    def validate(self):
        if self.quick:
            for key, value in QUICK.items():
                setattr(self, key, value)
        tiny = is_tiny_model(self.pretrained_model_name_or_path)
        for key, (paper, world) in DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, world if tiny else paper)
        if self.segmenter is None:
            if not tiny:
                raise ConfigError(
                    "--segmenter is needed on a real model: an AutoModelForSemanticSegmentation in the label space of "
                    "the masks (e.g. nvidia/segformer-b4-finetuned-ade-512-512 for ADE20K), or world"
                )
            self.segmenter = "world"
        RunConfig.validate(self)
        if not self.eval_data_dir:
            raise ConfigError("--eval_data_dir is needed: a held-out folder in the layout of --train_data_dir")
        self.check_grid(CONTROL_METHODS)
        for method in self.methods:  # every training flag, checked once per method before anything runs
            self.run_config(method, 1.0, 0, Path(".")).validate()
        return self

    def grid(self) -> list[tuple[str, float, int]]:
        """The encoder alone has no adapter learning rate: it runs at ×1 only."""
        return [(m, s, seed) for m, s, seed in super().grid() if m != "encoder" or s == self.lr_scales[0]]

    def run_name(self, method: str, scale: float, seed: int) -> str:
        return f"encoder-seed{seed}" if method == "encoder" else super().run_name(method, scale, seed)

    def run_config(self, method: str, scale: float, seed: int, run_dir: Path) -> ControlConfig:
        return self.one_run(ControlConfig, CONTROL_METHODS, method, scale, seed, run_dir, validation_image=None)

    def settings(self) -> dict:
        """What every run shares (the benchmark's identity: a resume must match it)."""
        return shipped_model_named(self.identity())


@dataclass(frozen=True)
class EvalRow:
    image: Path
    control: Path
    caption: str
    mask: Path | None


def read_eval_rows(config: ControlBenchConfig) -> list[EvalRow]:
    """The evaluation folder's rows (checked as the training data is: every column and file), with their masks."""
    folder = Path(config.eval_data_dir)
    checked = ControlDataset(folder, None, 8, config.image_column, config.conditioning_image_column,
                             config.caption_column)  # fmt: skip
    lines = [line for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]
    rows = []
    for number, ((image, control, caption), line) in enumerate(zip(checked.rows, lines), start=1):
        mask = json.loads(line).get(config.mask_column)
        if mask is not None and not (folder / mask).is_file():
            raise ControlDataError(f"'{folder / 'metadata.jsonl'}' line {number}: missing mask file {mask}")
        rows.append(EvalRow(image, control, caption, None if mask is None else folder / mask))
    rows = rows[: config.num_eval]
    with_masks = sum(r.mask is not None for r in rows)
    if with_masks not in (0, len(rows)):
        raise ControlDataError(
            f"{with_masks} of {len(rows)} evaluation rows have a '{config.mask_column}' column: give every row a mask, "
            "or none (then the segmenter's reading of each target image is the reference)"
        )
    return rows


def read_mask(path: Path) -> np.ndarray:
    """A class-id mask image (single channel: L, P, I or I;16), as (H, W) int64."""
    with Image.open(path) as image:
        if image.mode not in ("L", "P", "I", "I;16", "1"):
            raise ControlDataError(
                f"{path.name}: a mask must be a single-channel image of class ids (mode L, P or I), not {image.mode}"
            )
        return np.asarray(image, dtype=np.int64)


class ControlBench(BenchRunner):
    """One invocation on a control dataset folder: one group (the evaluation set), scored by a ``Segmenter``."""

    kind = TaskKind.CONTROL
    methods = CONTROL_METHODS
    base_fields = {"real": ("scores",), "reference": ("text",)}  # the segmenter on the real targets

    def __init__(self, config: ControlBenchConfig, callbacks, command: str | None, log, segmenter=None):
        super().__init__(config, callbacks, command, log)
        self.rows = read_eval_rows(config)
        self.base = BasePipeline(config, EtherControlPipeline)
        self.world = config.segmenter == "world"
        device = self.base.device
        if segmenter is not None:
            self.world = isinstance(segmenter, WorldSegmenter)
        else:
            segmenter = WorldSegmenter() if self.world else TransformersSegmenter(config.segmenter, device)
        self.segmenter: Segmenter = segmenter
        self.metrics = (Metric("miou", "mIoU"), Metric("pixel_accuracy", "pixel acc"))
        if self.world:
            self.metrics += (Metric("prompt_fidelity", "prompt fidelity", "CLIP-T"), Metric("fd", "FD", "FID", False))
        self._real = None
        if self.rows[0].mask is not None:
            self.reference = np.stack([read_mask(r.mask) for r in self.rows])
        else:
            self.reference = None  # the segmenter's reading of the real targets, made on first use
        self.open_store({**config.settings(), "eval_rows": len(self.rows), **self.segmenter.identity()})

    # --- pieces -----------------------------------------------------------------------------------------------
    def groups(self) -> list[str]:
        return ["all"]

    def group_name(self, group: str) -> str:
        return group

    def group_fields(self, group: str) -> dict:
        return dict(unit=group)

    @property
    def real(self) -> list:
        """The rows' target images (read on first use: a large evaluation set needs them only for some metrics)."""
        if self._real is None:
            self._real = image_files([r.image for r in self.rows])
        return self._real

    def references(self) -> np.ndarray:
        if self.reference is None:
            size = self.real[0].size[::-1]
            self.reference = self.segmenter.segment(self.real, size)
        return self.reference

    def controls(self, resolution: int | None, count: int | None = None) -> list[Image.Image]:
        """The first ``count`` rows' control images, resized to ``resolution`` (nearest: class colours stay exact)."""
        out = []
        for row in self.rows[:count]:
            control = open_control_image(row.control, "control image").convert("RGB")
            if resolution and control.size != (resolution, resolution):
                control = control.resize((resolution, resolution), Image.NEAREST)  # class colours stay exact
            out.append(control)
        return out

    def sample(self, pipe, folder: Path, controlled: bool) -> list:
        config, K = self.config, self.config.images_per_prompt
        folder.mkdir(parents=True, exist_ok=True)
        resolution = config.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        wanted = [(r, k, folder / f"{r:05d}-{k}.png") for r in range(len(self.rows)) for k in range(K)]
        missing = [item for item in wanted if not item[2].is_file()]
        controls = self.controls(resolution) if controlled and missing else None
        for start in range(0, len(missing), config.sample_batch):
            chunk = missing[start : start + config.sample_batch]
            generators = [torch.Generator().manual_seed(config.eval_seed + r * K + k) for r, k, _ in chunk]
            extra = {"image": [controls[r] for r, _, _ in chunk]} if controlled else {}
            images = pipe([self.rows[r].caption for r, _, _ in chunk], generator=generators,
                          num_inference_steps=config.inference_steps, guidance_scale=config.guidance_scale,
                          height=resolution, width=resolution, **extra).images  # fmt: skip
            for (_, _, path), image in zip(chunk, images):
                save_image(image, path)
        return image_files([path for _, _, path in wanted])

    def score(self, images: list) -> dict[str, float]:
        K = self.config.images_per_prompt
        reference = np.repeat(self.references(), K, axis=0)
        predicted = self.segmenter.segment(images, reference.shape[1:])
        scores = scores_of_masks(predicted, reference, IGNORE_INDEX)
        if self.world:
            evaluator = self.segmenter.evaluator
            captions = [row.caption for row in self.rows for _ in range(K)]
            scores["prompt_fidelity"] = prompt_fidelity(images, captions, evaluator)["overall"]
            scores["fd"] = frechet_distance(embed(images, evaluator), embed(self.real, evaluator))
        return scores

    # --- runs -------------------------------------------------------------------------------------------------
    def base_record(self, group: str) -> dict:
        images = self.sample(self.base.pipe, self.store.run_dir(group, "base") / "samples", controlled=False)
        real = scores_of_masks(self.segmenter.segment(self.real, self.references().shape[1:]), self.references())
        if self.world:
            real["prompt_fidelity"] = prompt_fidelity(self.real, [r.caption for r in self.rows],
                                                      self.segmenter.evaluator)["overall"]  # fmt: skip
        return dict(
            unit=group, method="base", label="base model (no control)", lr=None, lr_scale=None, seed=None,
            parameters=0, diverged=False, images=len(images), metrics=self.score(images), real=real,
            reference="mask column" if self.rows[0].mask is not None else "segmenter on the targets",
        )  # fmt: skip

    def load_run(self, pipe, method: str, run_config: ControlConfig, path: Path):
        """Copies of the UNet with the run's adapter and condition encoder; returns (modules, trainable params)."""
        modules, parameters, extra = adapted_modules(pipe, self.task(method, run_config), path)
        if "unet" not in modules:  # the encoder alone: an unadapted copy to attach it to
            modules["unet"] = copy.deepcopy(pipe.unet).requires_grad_(False).eval()
        unet = modules["unet"]
        encoder = ConditionEncoder(ConditionEncoderConfig.for_model(unet, pipe.vae_scale_factor))
        encoder.load_state_dict(extra[ENCODER_MODULE])
        attach_condition_encoder(unet, encoder.to(unet.device, unet.dtype).eval())
        return modules, parameters + sum(p.numel() for p in encoder.parameters())

    def run_config(self, group: str, method: str, scale: float, seed: int, run_dir: Path) -> ControlConfig:
        return self.config.run_config(method, scale, seed, run_dir)

    def evaluate(self, group: str, method: str, run_config: ControlConfig, run_dir: Path, adapter: Path,
                 snapshots: dict[int, Path]) -> dict:  # fmt: skip
        start = time.time()
        modules, parameters = self.load_run(self.base.pipe, method, run_config, adapter)
        with swapped(self.base.pipe, modules) as pipe:
            images = self.sample(pipe, run_dir / "samples", controlled=True)
        del modules
        return dict(parameters=parameters, images=len(images), sample_seconds=time.time() - start,
                    metrics=self.score(images))  # fmt: skip

    def result(self) -> dict:
        config = self.config
        records = self.store.collect()  # every finished run of this folder, also those of earlier invocations
        units = [{**r, "seed": r["seed"] if r["seed"] is not None else 0} for r in records]
        summary = summarise(units, self.metrics, ["base", *CONTROL_METHODS], unit="seed")
        base = next((r for r in records if r["method"] == "base"), None)
        references = []
        if base is not None:
            references.append(dict(kind="ceiling", label=f"real targets ({base['reference']})", runs=len(self.rows),
                                   metrics={k: mean_sd([v]) for k, v in base["real"].items()}))  # fmt: skip
        about = [
            f"Data: train `{config.train_data_dir}`, evaluation `{config.eval_data_dir}` ({len(self.rows)} rows); "
            f"model `{config.settings()['pretrained_model_name_or_path']}`; segmenter `{config.segmenter}`",
            "Training: " + (f"{config.max_train_steps} steps" if config.max_train_steps else
                             f"{config.num_train_epochs} epochs") + f" × batch {config.train_batch_size}, encoder lr "
            f"{config.encoder_learning_rate:g}, captions dropped with p={config.proportion_empty_prompts:g}; training "
            f"seeds {sorted({r['seed'] for r in records if r['method'] != 'base'})}",
            f"Evaluation: {config.images_per_prompt} image(s) per row, {config.scheduler} {config.inference_steps} "
            f"steps, guidance {config.guidance_scale:g}",
        ]  # fmt: skip
        return dict(
            kind="control",
            command=self.command,
            date=time.strftime("%Y-%m-%d"),
            machine=machine(),
            output_dir=str(config.output_dir),
            about=about,
            settings={
                **config.settings(),
                "methods": config.methods,
                "seeds": config.seeds,
                "lr_scales": config.lr_scales,
            },  # fmt: skip
            metrics=[dataclasses.asdict(m) for m in self.metrics],
            metrics_description=(
                f"mIoU and pixel accuracy of `{config.segmenter}`'s segmentation of the generated images against the "
                + (
                    "masks of the evaluation rows"
                    if self.rows[0].mask is not None
                    else "its segmentation of the real targets"
                )
                + (
                    ", over the whole evaluation set; prompt fidelity (the world evaluator's attribute readout "
                    "against the caption) and FD (FID's formula on the evaluator's 128-d embeddings, generated vs "
                    "real targets)"
                    if self.world
                    else ""
                )
            ),  # fmt: skip
            rows=records,
            summary=summary,
            references=references,
        )

    def samples_figure(self, result: dict) -> None:
        """``control_samples.png``: the first evaluation rows' controls and real targets, then the base model and
        each method (lowest seed, ×1 or its first lr scale), image 0 of each."""
        columns = min(6, len(self.rows))
        rows = [("control", self.controls(None, columns)), ("real target", [r.image for r in self.rows[:columns]])]
        shown = [r for r in result["rows"] if r.get("images")]
        for label, r in shown_runs(shown, ["base", *CONTROL_METHODS]):
            folder = self.store.root / "runs" / r["run"] / "samples"
            rows.append((label, [p for p in (folder / f"{i:05d}-0.png" for i in range(columns)) if p.is_file()]))
        labels = sample_grid(rows, self.store.root / "control_samples.png")
        result["samples_figure"] = {"file": "control_samples.png", "rows": labels}

    def write_report(self) -> dict:
        result = self.result()
        self.samples_figure(result)
        return write_result(self.config.output_dir, "control", result, self.metrics,
                            "Controllable synthesis benchmark", "training seeds")  # fmt: skip


def export_world_control(output: str | Path, task: str = "segmentation", train_scenes: int = 2000,
                         eval_scenes: int = 64, overwrite: bool = False) -> tuple[Path, Path]:  # fmt: skip
    """The tiny world's control data: ``output/train`` (scenes from ``TRAIN_START``) and ``output/eval`` (held-out
    scenes from ``EVAL_START``, never trained on), both in the control script's layout with a ``mask`` column."""
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ControlDataError(f"'{output}' exists and is not empty; pass --overwrite to replace it")
    if train_scenes < 1 or eval_scenes < 1:
        raise ControlDataError("--train_scenes and --eval_scenes must be at least 1")
    with atomic_folder(output) as staging:
        write_world_control_dataset(staging / "train", task, train_scenes, start=TRAIN_START)
        write_world_control_dataset(staging / "eval", task, eval_scenes, start=EVAL_START)
    return output / "train", output / "eval"


def run_control_bench(config: ControlBenchConfig, callbacks=(), command: str | None = None, log=print,
                      segmenter: Segmenter | None = None) -> dict:  # fmt: skip
    """Validate ``config``, run (or resume) every run of its grid and write the table; returns the result dict.
    ``segmenter``: any ``Segmenter`` instead of the one ``config.segmenter`` names."""
    config.validate()
    if command is None and sys.argv and sys.argv[0].endswith("ether-diffusion"):
        command = " ".join(["ether-diffusion", *sys.argv[1:]])
    return ControlBench(config, callbacks, command, log, segmenter).execute()


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> ControlBenchConfig:
    """The benchmark's flags (every training flag of its task, plus the grid's), validated."""
    return ControlBenchConfig.from_args(argv, prog)


def main(config: ControlBenchConfig, command: str | None = None) -> dict:
    """Run ``config`` (``run_control_bench``) and say where the table is."""
    result = run_control_bench(config, command=command)
    folder = Path(result["output_dir"])
    print(f"table: {folder / 'control.md'} (every run: control.json, plot: control.png)")
    return result
