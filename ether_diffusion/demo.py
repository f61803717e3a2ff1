"""The demo: teach the shipped tiny model a shipped subject with ETHER+, then show and measure what it learned.

``ether-diffusion demo`` trains on the embedded default with the library's DreamBooth task, samples the subject's
evaluation prompts with and without the adapter (same seeds), writes a grid (one column per prompt, titled with
the prompt and seed) and a metrics JSON, and prints where they are.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import METHOD_LABELS
from .files import atomic_write

__all__ = ["DEFAULT_SUBJECT", "run_demo"]

DEFAULT_SUBJECT = "orange_checkered_star"


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
    from .assets import default_subjects_path
    from .evaluation import instance_self_similarity, load_evaluator, prompt_fidelity, subject_fidelity
    from .models import load_pipeline
    from .pipeline import load_ether_weights
    from .registry import train
    from .sampling import sample_images
    from .training.artifacts import labelled_grid
    from .training.dreambooth import DreamBoothConfig
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
