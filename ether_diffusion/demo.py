"""The demo: teach the shipped tiny model a shipped subject with ETHER+, then show and measure what it learned.

``ether-diffusion demo`` trains on the embedded default, samples the subject's evaluation prompts with and
without the adapter (same seeds), writes a side-by-side grid and a metrics JSON, and prints where they are.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .io import atomic_write

__all__ = ["run_demo"]

DEFAULT_SUBJECT = "orange_checkered_star"


def _sample(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> list[Image.Image]:
    """One image per (prompt, seed); image k of a prompt always uses seed ``seeds[k]`` (batch independent)."""
    rows = [(p, s) for p in prompts for s in seeds]
    images = []
    for start in range(0, len(rows), 32):
        chunk = rows[start : start + 32]
        generators = [torch.Generator().manual_seed(s) for _, s in chunk]
        images += pipe(
            [p for p, _ in chunk], generator=generators, num_inference_steps=steps, guidance_scale=guidance
        ).images
    return images


def _label(image: Image.Image, text: str, width: int) -> Image.Image:
    canvas = Image.new("RGB", (width + image.width, image.height), "white")
    canvas.paste(image, (width, 0))
    ImageDraw.Draw(canvas).text((4, image.height // 2 - 6), text, fill="black")
    return canvas


def side_by_side(
    instance: list[Image.Image], base: list[Image.Image], adapted: list[Image.Image], method_label: str, scale: int = 2
) -> Image.Image:
    """Rows: the instance images, the base model, the adapted model (same prompt and seed per column)."""
    size = base[0].width * scale

    def row(images):
        strip = Image.new("RGB", (size * len(base), size), "white")
        for i, image in enumerate(images):
            strip.paste(image.resize((size, size), Image.NEAREST), (i * size, 0))
        return strip

    rows = [
        _label(row(instance), "instance", 90),
        _label(row(base), "base", 90),
        _label(row(adapted), method_label, 90),
    ]
    grid = Image.new("RGB", (rows[0].width, sum(r.height for r in rows) + 8 * (len(rows) - 1)), "white")
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height + 8
    return grid


def run_demo(
    output_dir: str | Path = "outputs/demo",
    subject: str = DEFAULT_SUBJECT,
    max_train_steps: int = 400,
    method: str = "ether_plus",
    learning_rate: float = 6e-3,
    num_class_images: int = 50,
    seeds_per_prompt: int = 4,
    max_prompts: int | None = None,
    inference_steps: int = 25,
    guidance_scale: float = 5.0,
    seed: int = 0,
    quiet: bool = False,
    extra_args: list[str] | None = None,
    class_data_dir: str | Path | None = None,
) -> dict:
    """Train, sample, grid, metrics. Returns the metrics dict (also written to ``metrics.json``)."""
    from .evaluation import instance_self_similarity, load_evaluator, prompt_fidelity, subject_fidelity
    from .pipeline import disable_ether, enable_ether, load_ether_weights
    from .training.dreambooth import parse_args, train
    from .world.assets import default_model_path, default_subjects_path, load_tiny_pipeline
    from .world.subjects import load_subject

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    chosen = load_subject(default_subjects_path() / subject)
    evaluator = load_evaluator()
    prompts = list(chosen.eval_prompts[:max_prompts] if max_prompts else chosen.eval_prompts)
    started = time.time()
    say = (lambda *a: None) if quiet else print

    say(
        f"[1/3] training {method} on subject '{chosen.name}' ({len(chosen.image_paths)} images, "
        f"'{chosen.instance_prompt}', prior '{chosen.class_prompt}') for {max_train_steps} steps"
    )
    args = parse_args(
        [
            "--pretrained_model_name_or_path",
            str(default_model_path()),
            "--instance_data_dir",
            str(chosen.image_paths[0].parent),
            "--instance_prompt",
            chosen.instance_prompt,
            "--with_prior_preservation",
            "--class_prompt",
            chosen.class_prompt,
            "--num_class_images",
            str(num_class_images),
            "--class_data_dir",
            str(class_data_dir or output_dir / "class_images"),
            "--ether_method",
            method,
            "--learning_rate",
            str(learning_rate),
            "--max_train_steps",
            str(max_train_steps),
            "--checkpointing_steps",
            str(max(max_train_steps, 1)),
            "--output_dir",
            str(output_dir / "adapter"),
            "--validation_prompt",
            prompts[0],
            "--num_validation_images",
            "4",
            "--validation_guidance_scale",
            str(guidance_scale),
            "--validation_inference_steps",
            str(inference_steps),
            "--seed",
            str(seed),
            "--report_to",
            "none",
            "--random_flip",
            *(["--quiet"] if quiet else []),
            *(extra_args or []),
        ]
    )
    result = train(args)

    say(f"[2/3] sampling {len(prompts)} new contexts × {seeds_per_prompt} seeds, with and without the adapter")
    pipe = load_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    load_ether_weights(pipe, result.adapter_path, adapter_name="subject")
    seeds = [1000 + seed + i for i in range(seeds_per_prompt)]
    disable_ether(pipe)
    base = _sample(pipe, prompts, seeds, inference_steps, guidance_scale)
    enable_ether(pipe)
    adapted = _sample(pipe, prompts, seeds, inference_steps, guidance_scale)

    say("[3/3] scoring with the world evaluator")
    instance = chosen.images()
    expanded = [p for p in prompts for _ in seeds]
    label = {"ether": "ETHER", "ether_plus": "ETHER+"}[method]
    metrics = {
        "subject": chosen.name,
        "method": label,
        "trainable_parameters": result.trainable_parameters,
        "train_steps": result.global_step,
        "train_seconds": round(result.train_seconds, 1),
        "total_seconds": None,
        "images_per_model": len(base),
        "subject_fidelity": {
            "base": subject_fidelity(base, instance, evaluator),
            "adapted": subject_fidelity(adapted, instance, evaluator),
            "instance_ceiling": instance_self_similarity(instance, evaluator),
        },
        "prompt_fidelity": {
            "base": prompt_fidelity(base, expanded, evaluator),
            "adapted": prompt_fidelity(adapted, expanded, evaluator),
        },
        "adapter": str(result.adapter_path),
    }
    first = [i * len(seeds) for i in range(len(prompts))]  # the first seed of every prompt
    grid = side_by_side(instance, [base[i] for i in first], [adapted[i] for i in first], label)
    grid_path = output_dir / "grid.png"
    grid.save(grid_path)
    metrics["grid"] = str(grid_path)
    metrics["prompts"] = prompts
    metrics["total_seconds"] = round(time.time() - started, 1)
    metrics_path = output_dir / "metrics.json"
    with atomic_write(metrics_path) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    fid = metrics["subject_fidelity"]
    say(
        f"\nsubject fidelity {fid['base']:.3f} (base) -> {fid['adapted']:.3f} ({label}); instance images to each "
        f"other: {fid['instance_ceiling']:.3f}"
    )
    say(
        f"prompt fidelity  {metrics['prompt_fidelity']['base']['overall']:.3f} (base) -> "
        f"{metrics['prompt_fidelity']['adapted']['overall']:.3f} ({label})"
    )
    say(
        f"grid:    {grid_path}\nmetrics: {metrics_path}\nadapter: {result.adapter_path}  "
        f"({result.trainable_parameters:,} parameters, {metrics['total_seconds']:.0f} s in all)"
    )
    return metrics
