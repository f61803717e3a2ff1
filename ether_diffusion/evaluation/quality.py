"""The tiny Stable Diffusion's quality gate: sample held-out caption combinations and read them back.

Gate: images sampled with 25 steps from held-out (shape, colour, background) combinations reach
prompt fidelity >= 0.8 on shape, colour and background. Subject novelty: base-model images of each subject's
class prompt must be clearly less similar to the instance images than the instance images are to each other.
"""

from __future__ import annotations

import numpy as np
import torch

from ether_diffusion.world.render import render
from ether_diffusion.world.scene import caption, scene_for_seed
from ether_diffusion.world.subjects import Subject

from .metrics import diversity, instance_self_similarity, prompt_fidelity, subject_fidelity
from .model import WorldEvaluator

GATE_ATTRIBUTES = ("shape", "colour", "background")
GATE_THRESHOLD = 0.8


def heldout_prompts(count: int) -> list[str]:
    """Full captions of held-out scenes (one object whose shape-colour-background was never in pretraining)."""
    return [caption(scene_for_seed(i, "heldout")) for i in range(count)]


def pretrain_prompts(count: int, start: int = 5_000_000) -> list[str]:
    """Full captions of pretraining-distribution scenes with seeds beyond any training set."""
    return [caption(scene_for_seed(start + i, "pretrain")) for i in range(count)]


@torch.no_grad()
def sample(
    pipe, prompts: list[str], seed: int, num_inference_steps: int, guidance_scale: float, batch_size: int = 32
) -> np.ndarray:
    """(N, 64, 64, 3) uint8; prompt i uses generator seed ``seed + i`` (independent of batching)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        generators = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images = pipe(
            chunk,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=64,
            width=64,
            generator=generators,
            output_type="np",
        ).images
        out.append((images * 255).round().astype(np.uint8))
    return np.concatenate(out)


def rendered_class_images(class_noun: str, count: int, start: int = 6_000_000) -> np.ndarray:
    """Rendered single-object pretraining scenes of the class noun's shape: what a perfect base model would
    draw for the class prompt (a reference for subject fidelity)."""
    images, seed = [], start
    while len(images) < count:
        scene = scene_for_seed(seed, "pretrain")
        if len(scene.objects) == 1 and scene.objects[0].shape == class_noun:
            images.append(render(scene).image)
        seed += 1
    return np.stack(images)


def run_quality_gate(
    pipe,
    evaluator: WorldEvaluator,
    subjects: list[Subject],
    num_prompts: int = 96,
    num_class_images: int = 16,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    seed: int = 0,
) -> dict:
    heldout = heldout_prompts(num_prompts)
    heldout_images = sample(pipe, heldout, seed, num_inference_steps, guidance_scale)
    in_dist = pretrain_prompts(num_prompts)
    in_dist_images = sample(pipe, in_dist, seed + 100_000, num_inference_steps, guidance_scale)
    result = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "heldout_prompt_fidelity": prompt_fidelity(heldout_images, heldout, evaluator),
        "pretrain_prompt_fidelity": prompt_fidelity(in_dist_images, in_dist, evaluator),
        "num_prompts": num_prompts,
        "num_class_images": num_class_images,
        "subjects": {},
    }
    result["gate_passed"] = all(result["heldout_prompt_fidelity"][a] >= GATE_THRESHOLD for a in GATE_ATTRIBUTES)
    for k, subject in enumerate(subjects):
        class_images = sample(
            pipe,
            [subject.class_prompt] * num_class_images,
            seed + 200_000 + 1000 * k,
            num_inference_steps,
            guidance_scale,
        )
        instances = subject.images()
        result["subjects"][subject.name] = {
            "class_prompt": subject.class_prompt,
            "base_vs_instances": subject_fidelity(class_images, instances, evaluator),
            "instances_vs_instances": instance_self_similarity(instances, evaluator),
            "rendered_class_vs_instances": subject_fidelity(
                rendered_class_images(subject.class_noun, num_class_images), instances, evaluator
            ),
            "class_prompt_fidelity": prompt_fidelity(
                class_images, [subject.class_prompt] * num_class_images, evaluator
            )["shape"],
            "class_diversity": diversity(class_images, evaluator),
        }
    result["_heldout_images"] = heldout_images
    result["_heldout_prompts"] = heldout
    return result


def sample_grid(images: np.ndarray, columns: int = 8, scale: int = 1) -> np.ndarray:
    rows = -(-len(images) // columns)
    pad = np.zeros((rows * columns - len(images), *images.shape[1:]), dtype=images.dtype)
    tiles = np.concatenate([images, pad]).reshape(rows, columns, *images.shape[1:])
    grid = np.concatenate([np.concatenate(list(row), axis=1) for row in tiles], axis=0)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)
