"""The demos: teach the shipped tiny model something on the embedded default, then show and measure what it learned.

- ``ether-diffusion demo`` (``run_demo``): a shipped subject with ETHER+ on the library's DreamBooth task; samples
  the subject's evaluation prompts with and without the adapter (same seeds), writes a grid (one column per prompt,
  titled with the prompt and seed) and a metrics JSON, and prints where they are.
- ``ether-diffusion demo --task control`` (``run_control_demo``): segmentation maps (or edges) → image. Renders a
  tiny-world dataset, trains a condition encoder + ETHER+ on the library's control task, then samples held-out
  controls with and without the control model (same prompts and seeds), writes a grid (control | base |
  controlled) and a metrics JSON (mIoU and pixel accuracy of the evaluator's segmentation against the control's
  mask, prompt fidelity), and prints where they are.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from PIL import Image

from .assets import default_subjects_path
from .config import METHOD_LABELS
from .control.data import edges_to_control, layout_free_caption, mask_to_control, write_world_control_dataset
from .control.pipeline import EtherControlPipeline
from .control.train import ControlConfig
from .evaluation import instance_self_similarity, load_evaluator, prompt_fidelity, subject_fidelity
from .evaluation.metrics import miou, segment
from .files import atomic_write
from .models import default_model, load_pipeline
from .pipeline import load_ether_weights
from .registry import train
from .sampling import sample_images
from .training.artifacts import labelled_grid, make_grid
from .training.dreambooth import DreamBoothConfig
from .world.dataset import render_arrays
from .world.subjects import load_subject

__all__ = ["DEFAULT_SUBJECT", "run_control_demo", "run_demo"]

DEFAULT_SUBJECT = "orange_checkered_star"
CONTROL_TRAIN_START, CONTROL_EVAL_START = 40_000_000, 41_000_000  # scene numbers: not pretraining's or the benchmark's


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
    class_data_dir: str | Path | None = None,
    **config_changes,
) -> dict:
    """Train, sample, grid, metrics. Returns the metrics dict (also written to ``metrics.json``).

    ``config_changes`` are further ``DreamBoothConfig`` fields (e.g. ``n_blocks=4``)."""
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
    config = DreamBoothConfig.for_subject(
        chosen,
        num_class_images=num_class_images,
        class_data_dir=str(class_data_dir or output_dir / "class_images"),
        ether_method=method,
        learning_rate=learning_rate,
        max_train_steps=max_train_steps,
        checkpointing_steps=max(max_train_steps, 1),
        output_dir=str(output_dir / "adapter"),
        validation_prompt=prompts[0],
        num_validation_images=4,
        validation_guidance_scale=guidance_scale,
        validation_inference_steps=inference_steps,
        seed=seed,
        random_flip=True,
        quiet=quiet,
        **config_changes,
    )
    result = train(config)

    say(f"[2/3] sampling {len(prompts)} new contexts × {seeds_per_prompt} seeds, with and without the adapter")
    pipe = load_pipeline()
    load_ether_weights(pipe, result.adapter_path, adapter_name="subject")
    seeds = [1000 + seed + i for i in range(seeds_per_prompt)]
    samples = sample_images(
        pipe,
        prompts,
        seeds,
        variants=("adapted", "base"),
        num_inference_steps=inference_steps,
        guidance_scale=guidance_scale,
        batch_size=32,
    )
    base = [s.image for s in samples if s.variant == "base"]
    adapted = [s.image for s in samples if s.variant == "adapted"]

    say("[3/3] scoring with the world evaluator")
    instance = chosen.images()
    expanded = [s.prompt for s in samples if s.variant == "base"]
    label = METHOD_LABELS[method]
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
    grid = labelled_grid(
        [
            ("instance\nimages", instance[: len(prompts)]),
            (f"base\nseed {seeds[0]}", [base[i] for i in first]),
            (f"{label}\nseed {seeds[0]}", [adapted[i] for i in first]),
        ],
        prompts,
    )
    grid_path = output_dir / "grid.png"
    with atomic_write(grid_path) as tmp:
        grid.save(tmp, format="PNG")
    metrics["grid"] = str(grid_path)
    metrics["grid_seed"] = seeds[0]
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
        f"grid:    {grid_path} (columns: the prompts, seed {seeds[0]}; rows: instance images, base, {label})\n"
        f"metrics: {metrics_path}\nadapter: {result.adapter_path}  "
        f"({result.trainable_parameters:,} parameters, {metrics['total_seconds']:.0f} s in all)"
    )
    return metrics


def _mask_scores(images, masks, prompts, evaluator) -> dict:
    predicted = segment(images, evaluator)
    return {
        "miou": round(miou(predicted, masks, num_classes=7), 4),
        "pixel_accuracy": round(float((predicted == masks).mean()), 4),
        "prompt_fidelity": round(prompt_fidelity(images, prompts, evaluator)["overall"], 4),
    }


def run_control_demo(
    output_dir: str | Path = "outputs/demo-control",
    task: str = "segmentation",
    max_train_steps: int = 600,
    train_scenes: int = 1000,
    eval_scenes: int = 16,
    inference_steps: int = 20,
    guidance_scale: float = 5.0,
    seed: int = 0,
    quiet: bool = False,
) -> dict:
    out = Path(output_dir)
    data = out / f"data-{task}"
    if not (data / "metadata.jsonl").is_file():
        print(f"rendering {train_scenes} {task} training scenes into {data}")
        write_world_control_dataset(data, task, train_scenes, start=CONTROL_TRAIN_START)
    held_out = render_arrays(eval_scenes, "pretrain", start=CONTROL_EVAL_START)
    to_control = mask_to_control if task == "segmentation" else edges_to_control
    controls = [to_control(m if task == "segmentation" else e) for m, e in zip(held_out.masks, held_out.edges)]
    prompts = [layout_free_caption(s) for s in held_out.scenes]
    validation = out / "validation-control.png"
    controls[0].save(validation)

    config = ControlConfig(
        pretrained_model_name_or_path=default_model(),
        train_data_dir=str(data),
        output_dir=str(out / "model"),
        max_train_steps=max_train_steps,
        train_batch_size=8,
        checkpointing_steps=max(max_train_steps // 2, 1),
        checkpoints_total_limit=1,
        proportion_empty_prompts=0.1,
        validation_image=[str(validation)],
        validation_prompt=[prompts[0]],
        validation_steps=max(max_train_steps // 3, 1),
        validation_inference_steps=inference_steps,
        num_validation_images=2,
        report_to="none",
        seed=seed,
        quiet=quiet,
    )
    result = train(config)

    pipe = load_pipeline(None, EtherControlPipeline)
    kwargs = dict(num_inference_steps=inference_steps, guidance_scale=guidance_scale)
    generators = lambda: [torch.Generator().manual_seed(seed + i) for i in range(eval_scenes)]  # noqa: E731
    base = pipe(prompts, generator=generators(), **kwargs).images
    pipe.load_control_weights(result.adapter_path)
    controlled = pipe(prompts, image=controls, generator=generators(), **kwargs).images
    evaluator = load_evaluator()
    metrics = {
        "task": task,
        "steps": result.global_step,
        "train_seconds": round(result.train_seconds, 1),
        "trainable_parameters": result.trainable_parameters,
        "eval_scenes": eval_scenes,
        "base_without_control": _mask_scores(base, held_out.masks, prompts, evaluator),
        "with_control": _mask_scores(controlled, held_out.masks, prompts, evaluator),
        "real_renders": _mask_scores([Image.fromarray(i) for i in held_out.images], held_out.masks, prompts, evaluator),
        "control_file": str(result.adapter_path),
    }
    columns = min(eval_scenes, 8)
    rows = [controls[:columns], base[:columns], controlled[:columns]]
    grid = make_grid([im for row in rows for im in row], columns)
    grid = grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST)
    with atomic_write(out / "control_grid.png") as tmp:
        grid.save(tmp, format="PNG")
    with atomic_write(out / "control_metrics.json") as tmp:
        Path(tmp).write_text(json.dumps(metrics, indent=1))
    b, c = metrics["base_without_control"], metrics["with_control"]
    print(
        f"\n{task} → image, {result.global_step} steps in {result.train_seconds:.0f} s "
        f"({result.trainable_parameters:,} trainable parameters)\n"
        f"  mIoU with the control's mask: {b['miou']:.3f} without control → {c['miou']:.3f} with it "
        f"(real renders {metrics['real_renders']['miou']:.3f})\n"
        f"  pixel accuracy: {b['pixel_accuracy']:.3f} → {c['pixel_accuracy']:.3f}; "
        f"prompt fidelity {b['prompt_fidelity']:.3f} → {c['prompt_fidelity']:.3f}\n"
        f"  grid (rows: control | base | controlled): {out / 'control_grid.png'}\n"
        f"  metrics: {out / 'control_metrics.json'}\n  control file: {result.adapter_path}"
    )
    return metrics
