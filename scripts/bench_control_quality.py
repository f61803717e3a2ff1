#!/usr/bin/env python
"""Controllable synthesis on the tiny world: encoder only, ETHER, ETHER+, OFT and LoRA, across learning rates.

    python scripts/bench_control_quality.py                          # segmentation→image, the default sweep
    python scripts/bench_control_quality.py --task edges --methods encoder ether_plus
    python scripts/bench_control_quality.py --quick                  # smoke test

Every method trains on the library's control task and loop (what ``ether-diffusion train-control`` runs) the same
condition encoder (the paper's layout, lr 1e-4) with the frozen tiny model, plus its adapter on the attention
projections and GEGLU ``ff.net.0.proj`` (the paper's control targets): our ETHER / ETHER+ (lr 1e-3, the paper's),
PEFT's OFT at its defaults (1e-5, the paper's) and PEFT's LoRA r=4 (1e-4: the paper could not make LoRA work here
and gives no rate; 1e-4 keeps LoRA's DreamBooth ratio to ETHER) as peers on the same loop. Same dataset folder
(rendered once), data order, noise, steps and batch for all.

Evaluation, on held-out scenes (other scene numbers than training): each control is sampled with its caption, then
- mIoU and pixel accuracy between the input mask and the evaluator's segmentation of the generated image;
- FD: the Fréchet distance between the evaluator's 128-d embeddings of the generated images and of real renders
  of the same scenes (FID's formula on our world's features; lower is better; "real vs real" gives its floor);
- prompt fidelity (the evaluator's attribute readout against the caption).
Writes ``control_quality.{md,json,png}`` and a sample grid (control | ground truth | methods).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ether_diffusion.control.data import (
    edges_to_control,
    layout_free_caption,
    mask_to_control,
    write_world_control_dataset,
)
from ether_diffusion.control.pipeline import EtherControlPipeline
from ether_diffusion.control.train import ControlConfig, ControlTask
from ether_diffusion.evaluation import load_evaluator, prompt_fidelity
from ether_diffusion.evaluation.metrics import embed, segment
from ether_diffusion.models import default_model, load_pipeline
from ether_diffusion.training.artifacts import make_grid
from ether_diffusion.training.trainer import Trainer, TrainingDivergedError
from ether_diffusion.world.dataset import render_arrays

PAPER_LR = {"encoder": 0.0, "ether": 1e-3, "ether_plus": 1e-3, "oft": 1e-5, "lora": 1e-4}
LABELS = {
    "encoder": "encoder only",
    "ether": "ETHER",
    "ether_plus": "ETHER+ (two-sided)",
    "oft": "OFT (PEFT)",
    "lora": "LoRA r=4 (PEFT)",
}
ENCODER_LR = 1e-4
TRAIN_START, EVAL_START = 20_000_000, 30_000_000  # scene numbers: disjoint from each other and from pretraining


def controls_for(task: str, arrays) -> list[Image.Image]:
    if task == "segmentation":
        return [mask_to_control(m) for m in arrays.masks]
    return [edges_to_control(e) for e in arrays.edges]


def training_folder(task: str, count: int, root: Path) -> Path:
    """The rendered training set in the control script's layout (written once, reused)."""
    folder = root / f"{task}-{count}-{TRAIN_START}"
    if not (folder / "metadata.jsonl").is_file():
        write_world_control_dataset(folder, task, count, start=TRAIN_START)
    return folder


def train_one(method: str, lr: float, args, data_dir: Path, work_dir: Path):
    """Train the encoder (+ adapter) on the library's control task; returns (task, result, adapter parameters)."""
    config = ControlConfig(
        pretrained_model_name_or_path=default_model(),
        train_data_dir=str(data_dir),
        no_adapters=method == "encoder",
        ether_method=method if method in ("ether", "ether_plus") else "ether_plus",
        peer=method if method in ("lora", "oft") else None,
        learning_rate=lr or PAPER_LR["ether"],
        encoder_learning_rate=ENCODER_LR,
        max_train_steps=args.max_train_steps,
        train_batch_size=args.batch_size,
        proportion_empty_prompts=args.proportion_empty_prompts,
        checkpointing_steps=args.max_train_steps + 1,
        seed=args.seed,
        output_dir=str(work_dir),
        report_to="none",
        quiet=True,
    )
    task = ControlTask(config.validate())
    try:
        result = Trainer(task).train()
    except TrainingDivergedError as err:  # scored as it stands (a diverged model is a result of the sweep)
        print(f"  diverged: {err}", flush=True)
        result = None
    return task, result, sum(p.numel() for p in task.params)


@torch.no_grad()
def generate(pipe, unet, controls, prompts, args) -> list[Image.Image]:
    """Sample through the control pipeline (``image=`` when ``unet`` has an encoder attached)."""
    original = pipe.unet
    pipe.unet = unet
    controlled = getattr(unet, "_ether_condition", None) is not None
    try:
        images = []
        for i in range(0, len(prompts), args.sample_batch):
            chunk = prompts[i : i + args.sample_batch]
            generators = [torch.Generator().manual_seed(args.seed * 100_000 + i + j) for j in range(len(chunk))]
            extra = {"image": controls[i : i + len(chunk)]} if controlled else {}
            images += pipe(
                chunk,
                generator=generators,
                num_inference_steps=args.inference_steps,
                guidance_scale=args.guidance_scale,
                **extra,
            ).images
        return images
    finally:
        pipe.unet = original


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID's formula: |mu_a - mu_b|² + tr(C_a + C_b - 2 (C_a C_b)^½), with tr((C_a C_b)^½) taken as the sum of the
    square roots of the eigenvalues of C_a^½ C_b C_a^½ (symmetric, so no general matrix square root is needed)."""
    a, b = a.double().numpy(), b.double().numpy()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


def score(images, masks, prompts, reference_embeddings, evaluator) -> dict:
    predicted = segment(images, evaluator)
    ious = []
    for c in range(7):
        p, t = predicted == c, masks == c
        union = np.logical_or(p, t).sum()
        if union:
            ious.append(np.logical_and(p, t).sum() / union)
    return dict(
        miou=float(np.mean(ious)),
        pixel_accuracy=float((predicted == masks).mean()),
        fd=frechet_distance(embed(images, evaluator), reference_embeddings),
        prompt_fidelity=prompt_fidelity(images, prompts, evaluator)["overall"],
    )


def markdown(result) -> str:
    r = result
    lines = [
        f"# Controllable synthesis on the tiny world: {r['task']} → image",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}; {r['date']}  ",
        f"Training: {r['steps']} steps × batch {r['batch_size']} on {r['train_scenes']} scenes (captions dropped "
        f"with p={r['proportion_empty_prompts']}), encoder lr {ENCODER_LR:g}, seed {r['seed']}. Evaluation: "
        f"{r['eval_scenes']} held-out scenes, {r['inference_steps']} DPM-Solver steps, guidance {r['guidance']}.",
        "",
        f"Reference: the base model without control {r['base']['miou']:.3f} mIoU / {r['base']['pixel_accuracy']:.3f} "
        f"accuracy / FD {r['base']['fd']:.3f} / prompt fidelity {r['base']['prompt_fidelity']:.3f}; real renders of "
        f"the scenes {r['real']['miou']:.3f} / {r['real']['pixel_accuracy']:.3f}; FD between two sets of real "
        f"renders {r['real_fd']:.3f}.",
        "",
        "| method | lr (× paper) | adapter params | trainable | mIoU ↑ | pixel acc ↑ | FD ↓ | prompt fidelity ↑ | "
        "train s | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lr = "—" if row["method"] == "encoder" else f"{row['lr']:.0e} (×{row['lr_scale']:g})"
        lines.append(
            f"| {LABELS[row['method']]} | {lr} | {row['adapter_parameters']:,} | {row['trainable']:,} | "
            f"{row['miou']:.3f} | {row['pixel_accuracy']:.3f} | {row['fd']:.3f} | {row['prompt_fidelity']:.3f} | "
            f"{row['train_seconds']:.0f} | {row['final_loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in PAPER_LR:
        rows = [r for r in result["rows"] if r["method"] == method]
        if not rows:
            continue
        if method == "encoder":
            for axis, key in zip(axes, ("miou", "fd")):
                axis.axhline(rows[0][key], color="black", linestyle=":", label=LABELS[method])
            continue
        rows.sort(key=lambda r: r["lr_scale"])
        scales = [r["lr_scale"] for r in rows]
        axes[0].plot(scales, [r["miou"] for r in rows], marker="o", label=LABELS[method])
        axes[1].plot(scales, [r["fd"] for r in rows], marker="o", label=LABELS[method])
    axes[0].axhline(result["base"]["miou"], color="gray", linestyle="--", label="base model (no control)")
    for axis, title in zip(axes, ("mIoU (control followed) ↑", "FD to real renders ↓")):
        axis.set_xscale("log")
        axis.set_xlabel("learning rate / paper's")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['task']} → image, tiny world ({result['steps']} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["segmentation", "edges"], default="segmentation")
    parser.add_argument("--methods", nargs="+", default=list(PAPER_LR), choices=list(PAPER_LR))
    parser.add_argument("--lr_scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--sweep_methods", nargs="*", default=["ether", "ether_plus", "oft"], choices=list(PAPER_LR))
    parser.add_argument("--sweep_scales", type=float, nargs="*", default=[0.1, 10.0])
    parser.add_argument("--max_train_steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--train_scenes", type=int, default=2000)
    parser.add_argument("--eval_scenes", type=int, default=64)
    parser.add_argument("--proportion_empty_prompts", type=float, default=0.1)
    parser.add_argument("--inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--sample_batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default="docs/benchmarks")
    parser.add_argument("--data_root", default="outputs/control_data", help="where the rendered training set goes")
    parser.add_argument("--quick", action="store_true", help="2 steps, 4 scenes: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_train_steps, args.train_scenes, args.eval_scenes, args.inference_steps = 2, 8, 4, 2
        args.sweep_scales, args.batch_size = [], 2
    return args


def main(args) -> dict:
    torch.manual_seed(0)
    pipe = load_pipeline(None, EtherControlPipeline)
    base_unet = pipe.unet
    evaluator = load_evaluator()
    data_dir = training_folder(args.task, args.train_scenes, Path(args.data_root))
    held_out = render_arrays(args.eval_scenes, "pretrain", start=EVAL_START)
    other_real = render_arrays(args.eval_scenes, "pretrain", start=EVAL_START + 1_000_000)
    controls, prompts = controls_for(args.task, held_out), [layout_free_caption(s) for s in held_out.scenes]
    real_images = [Image.fromarray(i) for i in held_out.images]
    reference = embed(real_images, evaluator)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"control_quality_{args.task}" + ("_quick" if args.quick else "")
    base_images = generate(pipe, base_unet, controls, prompts, args)
    result = dict(
        command="python " + " ".join(sys.argv),
        date=time.strftime("%Y-%m-%d"),
        machine=f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
        task=args.task,
        steps=args.max_train_steps,
        batch_size=args.batch_size,
        train_scenes=args.train_scenes,
        eval_scenes=args.eval_scenes,
        proportion_empty_prompts=args.proportion_empty_prompts,
        inference_steps=args.inference_steps,
        guidance=args.guidance_scale,
        seed=args.seed,
        base=score(base_images, held_out.masks, prompts, reference, evaluator),
        real=score(real_images, held_out.masks, prompts, reference, evaluator),
        real_fd=frechet_distance(embed([Image.fromarray(i) for i in other_real.images], evaluator), reference),
        rows=[],
    )
    grid_rows = {"control": controls[:6], "real": real_images[:6], "base (no control)": base_images[:6]}
    runs = [(m, s) for m in args.methods for s in ([1.0] if m == "encoder" else args.lr_scales)]
    runs += [
        (m, s) for m in args.sweep_methods if m in args.methods for s in args.sweep_scales if s not in args.lr_scales
    ]
    for method, scale in runs:
        lr = PAPER_LR[method] * scale
        with tempfile.TemporaryDirectory(prefix="bench-") as work_dir:
            task, trained, adapter = train_one(method, lr, args, data_dir, Path(work_dir))
        unet = task.components.unet.eval()
        trainable = adapter + sum(p.numel() for p in task.encoder.parameters())
        seconds, losses = (trained.train_seconds, trained.losses) if trained else (float("nan"), [float("nan")])
        images = generate(pipe, unet, controls, prompts, args)
        row = dict(
            method=method,
            lr_scale=scale,
            lr=lr,
            trainable=trainable,
            adapter_parameters=adapter,
            train_seconds=seconds,
            final_loss=statistics.fmean(losses[-50:]),
            losses_finite=trained is not None,
            **score(images, held_out.masks, prompts, reference, evaluator),
        )
        result["rows"].append(row)
        if scale == 1.0:
            grid_rows[LABELS[method]] = images[:6]
        print(
            f"{LABELS[method]:<20} lr {lr:.0e}: mIoU {row['miou']:.3f} acc {row['pixel_accuracy']:.3f} "
            f"FD {row['fd']:.3f} prompt {row['prompt_fidelity']:.3f} ({seconds:.0f} s)",
            flush=True,
        )
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(markdown(result))
    plot(result, out / f"{stem}.png")
    grid = make_grid([im for row in grid_rows.values() for im in row], 6)
    grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(out / f"{stem}_samples.png")
    (out / f"{stem}_samples.txt").write_text("rows, top to bottom: " + ", ".join(grid_rows) + "\n")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(parse_args())
