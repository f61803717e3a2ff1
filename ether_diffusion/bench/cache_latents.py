"""What --cache_latents (and --pre_compute_text_embeddings) save in a DreamBooth run on the shipped tiny model.

    ether-diffusion bench cache-latents                  # 5 rounds x 3 variants, 60 steps each
    ether-diffusion bench cache-latents --rounds 9 --steps 100 --json out.json

Each round trains every variant once, in an order rotated from round to round (the machine is shared and drifts:
interleaving spreads the drift over all variants); one untimed warm-up run comes first. The time is the loop's own
(``TrainResult.train_seconds``: from the first step to the last, without loading the model or the final save), per
step; the table gives the median over rounds and the ratio of medians. Center crop, so each of the subject's images
is one input and the cache holds one entry per image after the first epoch. Every run trains into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from ..assets import default_subjects_path
from ..registry import train
from ..training.dreambooth import DreamBoothConfig
from .timing import interleaved

VARIANTS = {
    "plain": {},
    "--cache_latents": {"cache_latents": True},
    "--cache_latents --pre_compute_text_embeddings": {"cache_latents": True, "pre_compute_text_embeddings": True},
}


def run_once(changes: dict, steps: int, subject: Path, output: Path) -> float:
    """Seconds per step of one DreamBooth run with the fields ``changes`` set."""
    config = DreamBoothConfig(
        instance_data_dir=str(subject),
        instance_prompt="a sks star",
        output_dir=str(output),
        max_train_steps=steps,
        checkpointing_steps=10**6,
        center_crop=True,
        report_to="none",
        quiet=True,
        **changes,
    )
    return train(config).train_seconds / steps


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--subject", default=str(default_subjects_path() / "orange_checkered_star"))
    parser.add_argument("--json", help="also write every timing here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    return args


def main(args: argparse.Namespace) -> dict:
    """Print the table; returns ``{"rounds", "steps", "seconds_per_step": {variant: [per round]}}``."""
    subject = Path(args.subject)
    with tempfile.TemporaryDirectory() as tmp:
        run_once({}, 5, subject, Path(tmp) / "warm-up")
        runs = []

        def visit(name):
            runs.append(name)
            round_index = (len(runs) - 1) // len(VARIANTS)
            seconds = run_once(VARIANTS[name], args.steps, subject, Path(tmp) / f"run-{len(runs)}")
            print(f"round {round_index + 1}/{args.rounds} {name}: {1000 * seconds:.1f} ms/step", flush=True)
            return seconds

        times = interleaved(list(VARIANTS), args.rounds, visit)
    base = statistics.median(times["plain"])
    print(f"\n{args.rounds} rounds x {args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}\n")  # fmt: skip
    print("| variant | ms/step (median) | min–max | speed-up |")
    print("|---|---|---|---|")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"| `{name}` | {1000 * median:.1f} | {1000 * min(seconds):.1f}–{1000 * max(seconds):.1f} | "
              f"{base / median:.2f}× |")  # fmt: skip
    report = {"rounds": args.rounds, "steps": args.steps, "seconds_per_step": times}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report
