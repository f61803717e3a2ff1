"""Adapters trained per hour when K DreamBooth runs share each step (``train --jobs``, ``training/pack.py``).

    ether-diffusion bench pack                                   # K = 1, 2, 4, 8, 16; 3 rounds of 20 steps
    ether-diffusion bench pack --packs 1 8 --rounds 5 --steps 40 --json out.json
    ether-diffusion bench pack --task control                     # control runs (batch 8 each, the bench's)

Each variant trains K jobs of the shipped subjects (cycled, each with its own seed; ``--task control``: control runs
on 16 tiny-world segmentation scenes, each with its own seed and encoder) on the shipped tiny model, all of
``--steps`` steps, as one packed run; every round runs every K once, the order rotated from round to round (the
machine drifts: interleaving spreads the drift over all of them), after an untimed warm-up that also draws the class
images the jobs share. The training time of a variant is the process's CPU time from the end of its first packed step
to the end of its last (with ``--threads 1`` on a quiet machine, the wall time of the work), per packed step: it
leaves out what every job pays once whatever K is (loading, class images, the final save), which the end-to-end
column adds back. Adapters per hour: K × 3600 / (steps × seconds per packed step); the ratio to K = 1 is taken within
each round. Peak memory is the process's resident high-water mark during the variant (VmHWM, reset before it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..assets import default_subjects_path
from ..control.data import write_world_control_dataset
from ..control.train import ControlConfig
from ..jobs import make_jobs
from ..training.dreambooth import DreamBoothConfig
from ..training.pack import PackedTrainer
from ..world.subjects import load_subjects
from .timing import Meter, interleaved, spread


class _Clock:
    """CPU time at the end of every packed step."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_pack_step(self, step, slots):
        self.stamps.append(time.process_time())


CONTROL_SCENES, CONTROL_BATCH = 16, 8  # the control benchmark's batch on the tiny model


def control_configs(count: int, steps: int, folder: Path, data: Path, resolution: int | None = None):
    """``count`` control runs on the tiny world's segmentation scenes in ``data``, each with a seed of its own."""
    if not (data / "metadata.jsonl").is_file():
        write_world_control_dataset(data, "segmentation", CONTROL_SCENES, start=40_000_000)
    return [(f"job{i}", ControlConfig(train_data_dir=str(data), seed=i, max_train_steps=steps,
                                      train_batch_size=CONTROL_BATCH, checkpointing_steps=10**6, resolution=resolution,
                                      output_dir=str(folder / f"job{i}"), no_final_reload=True, quiet=True,
                                      report_to="none"))
            for i in range(count)]  # fmt: skip


def pack_configs(count: int, steps: int, folder: Path, prior: bool, class_root: Path, resolution: int | None = None,
                 caches: bool = False, task: str = "dreambooth") -> list[tuple[str, object]]:  # fmt: skip
    """``count`` jobs on the shipped subjects, cycled, each with a seed of its own (or control runs)."""
    if task == "control":
        return control_configs(count, steps, folder, class_root / "control-data", resolution)
    subjects = load_subjects(default_subjects_path())
    named = []
    for i in range(count):
        subject = subjects[i % len(subjects)]
        config = DreamBoothConfig.for_subject(
            subject,
            seed=i,
            max_train_steps=steps,
            checkpointing_steps=10**6,
            with_prior_preservation=prior,
            num_class_images=4,
            class_data_dir=str(class_root / subject.name),
            output_dir=str(folder / f"job{i}"),
            no_final_reload=True,
            quiet=True,
            resolution=resolution,
            cache_latents=caches,
            pre_compute_text_embeddings=caches,
            center_crop=True,
        )
        named.append((f"job{i}", config))
    return named


def run_pack(count: int, steps: int, folder: Path, prior: bool, class_root: Path, resolution: int | None,
             caches: bool = False, task: str = "dreambooth") -> dict:  # fmt: skip
    """One packed run of ``count`` jobs: seconds per packed step (CPU), end-to-end wall seconds, peak RSS."""
    meter = Meter(torch.device("cpu"))
    meter.reset_peak()
    clock = _Clock()
    jobs = make_jobs(pack_configs(count, steps, folder, prior, class_root, resolution, caches, task))
    started = time.perf_counter()
    PackedTrainer(jobs, count, folder / "state", callbacks=[clock], quiet=True).train()
    wall = time.perf_counter() - started
    per_step = (clock.stamps[-1] - clock.stamps[0]) / max(1, len(clock.stamps) - 1)
    return {"step_seconds": per_step, "wall_seconds": wall, "peak_bytes": meter.peak()}


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--packs", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="the K to measure")
    parser.add_argument(
        "--task",
        choices=("dreambooth", "control"),
        default="dreambooth",
        help="DreamBooth jobs (the shipped subjects) or control runs (tiny-world segmentation)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="steps of every job")
    parser.add_argument(
        "--resolution", type=int, default=None,
        help="training resolution (default: the model's 64 px, 16² latents; 32 px gives 8² latents)",
    )  # fmt: skip
    parser.add_argument(
        "--caches", action="store_true",
        help="jobs with --cache_latents and --pre_compute_text_embeddings (each job its own cache and table)",
    )  # fmt: skip
    parser.add_argument("--no_prior", action="store_true", help="jobs without prior preservation (1 sample each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is the work done)")
    parser.add_argument("--json", help="also write every measurement here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 2 or min(args.packs) < 1:
        parser.error("--rounds and every --packs must be at least 1, --steps at least 2")
    if args.task == "control" and (args.caches or args.no_prior):
        parser.error("--caches and --no_prior are DreamBooth flags: control runs have neither")
    return args


def main(args: argparse.Namespace) -> dict:
    """Print the table; returns every measurement."""
    torch.set_num_threads(args.threads)
    prior = not args.no_prior
    names = [f"K={k}" for k in args.packs]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # draws the class images once
        run_pack(max(args.packs), 2, tmp / "warm-up", prior, tmp / "class", args.resolution, args.caches, args.task)
        count = [0]

        def visit(name):
            count[0] += 1
            k = int(name[2:])
            found = run_pack(
                k, args.steps, tmp / f"run-{count[0]}", prior, tmp / "class", args.resolution, args.caches, args.task
            )
            print(f"{name}: {1000 * found['step_seconds']:.1f} ms/packed step, {found['wall_seconds']:.1f} s end to "
                  f"end, peak {found['peak_bytes'] / 2**20:.0f} MB", flush=True)  # fmt: skip
            return found

        runs = interleaved(names, args.rounds, visit)
    base = [r["step_seconds"] for r in runs[names[0]]]
    base_k = args.packs[0]
    what = (
        f"control runs (batch {CONTROL_BATCH})"
        if args.task == "control"
        else f"{'with' if prior else 'without'} prior preservation, {'with' if args.caches else 'without'} caches"
    )
    print(f"\n{args.rounds} rounds x {args.steps} steps per job, {args.resolution or 64} px, {what}, "
          f"torch {torch.__version__}, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}\n")  # fmt: skip
    print(f"| K | ms per packed step (median, min–max) | adapters / hour (training) | × K={base_k} (per round) | "
          "adapters / hour end to end | peak RSS MB |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    table = {}
    for k, name in zip(args.packs, names):
        steps = [r["step_seconds"] for r in runs[name]]
        median = statistics.median(steps)
        per_hour = k * 3600 / (args.steps * median)
        ratios = spread([(k / base_k) * b / s for s, b in zip(steps, base)])
        wall = statistics.median(r["wall_seconds"] for r in runs[name])
        peak = statistics.median(r["peak_bytes"] for r in runs[name]) / 2**20
        table[name] = {"step_seconds": steps, "adapters_per_hour": per_hour, "ratio": ratios, "peak_mb": peak,
                       "wall_seconds": [r["wall_seconds"] for r in runs[name]]}  # fmt: skip
        print(f"| {k} | {1000 * median:.0f} ({1000 * min(steps):.0f}–{1000 * max(steps):.0f}) | {per_hour:,.0f} | "
              f"{ratios['median']:.2f}× ({ratios['min']:.2f}–{ratios['max']:.2f}) | {k * 3600 / wall:,.0f} | "
              f"{peak:.0f} |")  # fmt: skip
    report = {"task": args.task, "rounds": args.rounds, "steps": args.steps, "prior": prior, "threads": args.threads,
              "resolution": args.resolution, "caches": args.caches, "packs": table}  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report
