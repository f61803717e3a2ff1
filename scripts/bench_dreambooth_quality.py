"""Subject-driven quality of ETHER, ETHER+, LoRA and OFT on the tiny world, across learning rates.

    python scripts/bench_dreambooth_quality.py                       # all subjects, 2 seeds, lr ×0.1 ×1 ×10 ×100
    python scripts/bench_dreambooth_quality.py --subjects orange_checkered_star --seeds 0 --quick   # smoke test

Every method trains on the library's own DreamBooth task and loop (the one ``ether-diffusion train`` runs: dataset,
noise, loss, class images, AdamW, batch 1 + 1 class image for prior preservation, the same steps; LoRA and OFT are
PEFT peers on that same loop) on the shipped tiny model, then samples each subject's evaluation prompts and is
scored by the world evaluator: subject fidelity (our DINO), prompt fidelity (our CLIP-T),
diversity (our LPIPS). Learning rates are the paper's (ETHER/ETHER+ 6e-3, LoRA 6e-4, OFT 6e-5) times each scale,
unchanged for our shorter step budget. Writes a markdown table, a JSON file and a plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ether_diffusion.config import METHOD_LABELS
from ether_diffusion.evaluation import (
    diversity,
    instance_self_similarity,
    load_evaluator,
    prompt_fidelity,
    subject_fidelity,
)
from ether_diffusion.models import load_pipeline
from ether_diffusion.sampling import sample_images
from ether_diffusion.training.class_images import ensure_class_images
from ether_diffusion.training.data import load_image_folder
from ether_diffusion.training.dreambooth import DreamBoothConfig, DreamBoothTask
from ether_diffusion.training.trainer import Trainer, TrainingDivergedError
from ether_diffusion.world.assets import default_subjects_path
from ether_diffusion.world.subjects import load_subject

PAPER_LR = {"ether": 6e-3, "ether_plus": 6e-3, "lora": 6e-4, "oft": 6e-5}
LABELS = {**METHOD_LABELS, "ether_plus": "ETHER+ (two-sided)", "lora": "LoRA r=4 (PEFT)", "oft": "OFT (PEFT)"}


def train_one(subject, method: str, lr: float, steps: int, seed: int, class_dir: Path, num_class_images: int,
              guidance: float, work_dir: Path):  # fmt: skip
    """Train one (subject, method, lr, seed) on the library's DreamBooth task; returns (task, result)."""
    config = DreamBoothConfig.for_subject(
        subject,
        class_data_dir=str(class_dir),
        num_class_images=num_class_images,
        ether_method=method if method in ("ether", "ether_plus") else "ether_plus",
        peer=None if method in ("ether", "ether_plus") else method,
        learning_rate=lr,
        max_train_steps=steps,
        checkpointing_steps=steps + 1,  # no checkpoints: a benchmark run is not resumed
        seed=seed,
        output_dir=str(work_dir),
        validation_guidance_scale=guidance,
        quiet=True,
        no_final_reload=True,
    )
    task = DreamBoothTask(config.validate())
    try:
        return task, Trainer(task).train()
    except TrainingDivergedError as err:  # scored as it stands (a diverged model is a result of the sweep)
        print(f"  diverged: {err}", flush=True)
        return task, None


@torch.no_grad()
def sample(pipe, unet, prompts, seeds, steps, guidance):
    original = pipe.unet
    pipe.unet = unet.to(pipe.device).eval()
    try:
        samples = sample_images(pipe, prompts, seeds, num_inference_steps=steps, guidance_scale=guidance,
                                batch_size=len(seeds))  # fmt: skip
        return [s.image for s in samples]
    finally:
        pipe.unet = original


def timed_mean(group) -> float:
    """Mean train time over the rows whose timing is comparable (``timed``, default true); NaN if none is."""
    timed = [r["train_seconds"] for r in group if r.get("timed", True)]
    return statistics.fmean(timed) if timed else float("nan")


def summarise(rows):
    table = {}
    for row in rows:
        table.setdefault((row["method"], row["lr_scale"]), []).append(row)
    summary = []
    for (method, scale), group in sorted(table.items(), key=lambda kv: (list(PAPER_LR).index(kv[0][0]), kv[0][1])):

        def mean(key, group=group):
            return statistics.fmean(r[key] for r in group)

        def sd(key, group=group):
            return statistics.stdev(r[key] for r in group) if len(group) > 1 else 0.0

        summary.append(
            dict(
                method=method,
                lr_scale=scale,
                lr=group[0]["lr"],
                runs=len(group),
                subject_fidelity=mean("subject_fidelity"),
                subject_fidelity_sd=sd("subject_fidelity"),
                prompt_fidelity=mean("prompt_fidelity"),
                prompt_fidelity_sd=sd("prompt_fidelity"),
                diversity=mean("diversity"),
                parameters=group[0]["parameters"],
                train_seconds=timed_mean(group),
            )
        )
    return summary


def average_base(by_subject: dict) -> dict:
    scores = list(by_subject.values())
    return {key: statistics.fmean(s[key] for s in scores) for key in scores[0]}


def merge(paths: list[str], output_dir: str, timed: list[str] | None = None) -> dict:
    """Combine the JSON files of runs made in parts (e.g. one process per subject and seed) into one table.

    Train times count only from the ``timed`` files when given (e.g. the runs made alone on one machine, not the
    ones that shared a GPU with 15 others). A (subject, method, lr, seed) run present twice is an error.
    """
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows, seen = [], set()
    for path, part in zip(paths, parts):
        for row in part["rows"]:
            key = (row["subject"], row["method"], row["lr_scale"], row["seed"])
            if key in seen:
                raise ValueError(f"run {key} appears twice (again in {path})")
            seen.add(key)
            rows.append(dict(row, timed=timed is None or path in timed, machine=part["machine"]))
    base_by_subject = {name: scores for part in parts for name, scores in part.get("base_by_subject", {}).items()}
    result = dict(parts[0])
    result.update(
        command=f"python scripts/bench_dreambooth_quality.py --merge <{len(parts)} part files> (their commands: JSON)",
        part_commands=sorted({part["command"] for part in parts}),
        machine=" + ".join(sorted({part["machine"] for part in parts})),
        subjects=sorted(base_by_subject),
        seeds=sorted({row["seed"] for row in rows}),
        rows=rows,
        summary=summarise(rows),
        base_by_subject=base_by_subject,
        base=average_base(base_by_subject),
        parts=len(parts),
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dreambooth_quality.json").write_text(json.dumps(result, indent=1))
    (out / "dreambooth_quality.md").write_text(markdown(result))
    plot(result, out / "dreambooth_quality.png")
    print(markdown(result))
    return result


def markdown(result) -> str:
    lines = [
        "# DreamBooth quality on the tiny world",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; {result['date']}  ",
        f"Subjects: {', '.join(result['subjects'])}; seeds {result['seeds']}; {result['steps']} steps; "
        f"evaluation {result['eval_prompts']} prompts × {len(result['eval_seeds'])} seeds per subject, "
        f"DDIM {result['inference_steps']} steps, guidance {result['guidance']}",
        "",
        f"Reference: base model {result['base']['subject_fidelity']:.3f} subject fidelity / "
        f"{result['base']['prompt_fidelity']:.3f} prompt fidelity / {result['base']['diversity']:.3f} diversity; "
        f"instance images to each other {result['base']['instance_ceiling']:.3f}.",
        "",
        "Fidelities are means ± standard deviation over the runs (subjects × seeds) of each row.",
        "",
        "| method | lr (× paper) | runs | trainable | subject fidelity ↑ | prompt fidelity ↑ | diversity | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["summary"]:
        lines.append(
            f"| {LABELS[row['method']]} | {row['lr']:.0e} (×{row['lr_scale']:g}) | {row['runs']} | "
            f"{row['parameters']:,} | "
            f"{row['subject_fidelity']:.3f} ± {row.get('subject_fidelity_sd', 0):.3f} | "
            f"{row['prompt_fidelity']:.3f} ± {row.get('prompt_fidelity_sd', 0):.3f} | {row['diversity']:.3f} | "
            f"{row['train_seconds']:.0f} |".replace("nan", "—")
        )
    return "\n".join(lines) + "\n"


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in PAPER_LR:
        rows = [r for r in result["summary"] if r["method"] == method]
        if not rows:
            continue
        scales = [r["lr_scale"] for r in rows]
        axes[0].plot(scales, [r["subject_fidelity"] for r in rows], marker="o", label=LABELS[method])
        axes[1].plot(scales, [r["prompt_fidelity"] for r in rows], marker="o", label=LABELS[method])
    for axis, title in zip(axes, ("subject fidelity", "prompt fidelity")):
        axis.set_xscale("log")
        axis.set_xlabel("learning rate / paper's")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].axhline(result["base"]["subject_fidelity"], color="gray", linestyle="--", label="base model")
    axes[1].axhline(result["base"]["prompt_fidelity"], color="gray", linestyle="--")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", nargs="+", default=None, help="default: all shipped subjects")
    parser.add_argument("--methods", nargs="+", default=list(PAPER_LR), choices=list(PAPER_LR))
    parser.add_argument("--lr_scales", type=float, nargs="+", default=[0.1, 1.0, 10.0, 100.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max_train_steps", type=int, default=600)
    parser.add_argument("--num_class_images", type=int, default=50)
    parser.add_argument("--eval_seeds", type=int, nargs="+", default=[1000, 1001])
    parser.add_argument("--inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument("--class_root", default="outputs/class_images")
    parser.add_argument("--output_dir", default="docs/benchmarks")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the evaluator always runs on the CPU)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="merge the JSON files of partial runs, then exit")
    parser.add_argument("--timed", nargs="+", metavar="JSON", help="with --merge: the files whose train times count")
    parser.add_argument("--quick", action="store_true", help="2 steps, 2 prompts, 1 eval seed: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_train_steps, args.eval_seeds, args.inference_steps, args.num_class_images = 2, [1000], 2, 2
    return args


def main(args) -> dict:
    torch.manual_seed(0)
    device = torch.device(args.device)
    pipe = load_pipeline().to(device)
    base_unet = pipe.unet
    evaluator = load_evaluator()
    subjects = [
        load_subject(default_subjects_path() / name)
        for name in (args.subjects or sorted(p.name for p in default_subjects_path().iterdir() if p.is_dir()))
    ]
    rows, base_scores = [], {}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "dreambooth_quality" + ("_quick" if args.quick else "")
    result = dict(
        command="python " + " ".join(sys.argv),
        date=time.strftime("%Y-%m-%d"),
        machine=(
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
        )
        + f", torch {torch.__version__}",
        subjects=[s.name for s in subjects],
        seeds=args.seeds,
        steps=args.max_train_steps,
        eval_seeds=args.eval_seeds,
        inference_steps=args.inference_steps,
        guidance=args.guidance_scale,
    )
    for subject in subjects:
        prompts = list(subject.eval_prompts[:2] if args.quick else subject.eval_prompts)
        expanded = [p for p in prompts for _ in args.eval_seeds]
        instance = load_image_folder(subject.image_paths[0].parent)
        class_dir = Path(args.class_root) / subject.class_noun
        ensure_class_images(
            lambda: pipe,
            subject.class_prompt,
            class_dir,
            args.num_class_images,
            seed=0,
            num_inference_steps=25,
            guidance_scale=args.guidance_scale,
        )
        base = sample(pipe, base_unet, prompts, args.eval_seeds, args.inference_steps, args.guidance_scale)
        base_scores[subject.name] = dict(
            subject_fidelity=subject_fidelity(base, instance, evaluator),
            prompt_fidelity=prompt_fidelity(base, expanded, evaluator)["overall"],
            diversity=diversity(base, evaluator),
            instance_ceiling=instance_self_similarity(instance, evaluator),
        )
        for method in args.methods:
            for scale in args.lr_scales:
                for seed in args.seeds:
                    lr = PAPER_LR[method] * scale
                    with tempfile.TemporaryDirectory(prefix="bench-") as work_dir:
                        task, trained = train_one(
                            subject, method, lr, args.max_train_steps, seed, class_dir, args.num_class_images,
                            args.guidance_scale, Path(work_dir),
                        )  # fmt: skip
                    unet, params = task.components.unet, sum(p.numel() for p in task.params)
                    seconds, losses = (trained.train_seconds, trained.losses) if trained else (float("nan"), [])
                    images = sample(pipe, unet, prompts, args.eval_seeds, args.inference_steps, args.guidance_scale)
                    finite = trained is not None  # the loop stops a run whose loss or vectors go non-finite
                    row = dict(
                        subject=subject.name,
                        method=method,
                        lr_scale=scale,
                        lr=lr,
                        seed=seed,
                        parameters=params,
                        train_seconds=seconds,
                        losses_finite=finite,
                        subject_fidelity=subject_fidelity(images, instance, evaluator),
                        prompt_fidelity=prompt_fidelity(images, expanded, evaluator)["overall"],
                        diversity=diversity(images, evaluator),
                    )
                    rows.append(row)
                    print(
                        f"{subject.name:<24} {LABELS[method]:<20} lr {lr:.0e} seed {seed}: subject "
                        f"{row['subject_fidelity']:.3f} prompt {row['prompt_fidelity']:.3f} "
                        f"diversity {row['diversity']:.3f} ({seconds:.0f} s)",
                        flush=True,
                    )
                    result.update(
                        rows=rows,
                        summary=summarise(rows),
                        eval_prompts=len(prompts),
                        base_by_subject=base_scores,
                        base=average_base(base_scores),
                    )
                    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
                    (out / f"{stem}.md").write_text(markdown(result))
    plot(result, out / f"{stem}.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.merge:
        merge(arguments.merge, arguments.output_dir, arguments.timed)
    else:
        main(arguments)
