"""Run the tiny Stable Diffusion's quality gate and (optionally) write its model card and sample grid.

    ether-diffusion world evaluate --pretrained_model_name_or_path assets/tiny-sd --write_model_card

Samples held-out caption combinations with 25 steps, reads them back with the world evaluator (prompt fidelity
per attribute), samples each subject's class prompt and compares with the instance images (subject fidelity).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from ..assets import default_model_path
from ..models import load_tiny_pipeline
from ..world.subjects import load_subjects
from .model import load_evaluator
from .model_card import write_model_card
from .quality import GATE_ATTRIBUTES, GATE_THRESHOLD, run_quality_gate, sample_grid


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=str(default_model_path()))
    p.add_argument("--evaluator_path", default=None, help="default: assets/evaluator")
    p.add_argument("--subjects_dir", default=None, help="default: assets/subjects")
    p.add_argument("--num_prompts", type=int, default=96, help="held-out (and in-distribution) prompts")
    p.add_argument("--num_class_images", type=int, default=16, help="base-model images per subject class")
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--write_model_card",
        action="store_true",
        help="write README.md, samples.png and eval.json into the model folder",
    )
    p.add_argument("--output_json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.num_prompts < 1 or args.num_class_images < 2:
        p.error("--num_prompts must be >= 1 and --num_class_images >= 2")
    return args


def main(args: argparse.Namespace) -> dict:
    """Run the gate and print it; with ``--write_model_card`` also write the card, grid and scores; returns them."""
    torch.manual_seed(args.seed)
    pipe = load_tiny_pipeline(args.pretrained_model_name_or_path)
    evaluator = load_evaluator(args.evaluator_path)
    subjects = load_subjects(args.subjects_dir)
    result = run_quality_gate(
        pipe,
        evaluator,
        subjects,
        args.num_prompts,
        args.num_class_images,
        args.num_inference_steps,
        args.guidance_scale,
        args.seed,
    )
    images, prompts = result.pop("_heldout_images"), result.pop("_heldout_prompts")
    fid = result["heldout_prompt_fidelity"]
    print("held-out prompt fidelity:", json.dumps({k: round(v, 3) for k, v in fid.items()}))
    verdict = "PASSED" if result["gate_passed"] else "FAILED"
    print(f"gate (>= {GATE_THRESHOLD:.2f} on {', '.join(GATE_ATTRIBUTES)}): {verdict}")
    for name, s in result["subjects"].items():
        print(
            f"{name}: base vs instances {s['base_vs_instances']:.3f}, "
            f"instances vs instances {s['instances_vs_instances']:.3f}"
        )
    text = json.dumps(result, indent=2) + "\n"
    if args.output_json:
        Path(args.output_json).write_text(text)
    if args.write_model_card:
        folder = Path(args.pretrained_model_name_or_path)
        (folder / "eval.json").write_text(text)
        Image.fromarray(sample_grid(images[:32], columns=8)).save(folder / "samples.png", optimize=True)
        write_model_card(folder, result, prompts[:32])
    return result
