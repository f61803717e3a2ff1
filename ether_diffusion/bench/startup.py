"""How long the command line takes to answer: ``--help``, exporting a tiny adapter, and a one-step run on the shipped
tiny model, each a fresh process as a user types it, timed in interleaved rounds (every round runs each command once,
the order rotated) on the wall clock; medians and ranges. What each command writes to standard error is kept: the
commands print no warnings of their own making.

    ether-diffusion bench startup                   # 5 rounds
    ether-diffusion bench startup --rounds 9
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..assets import default_model_path, default_subjects_path
from .timing import interleaved

#: issue 26's goals on the 2-core reference machine, in seconds
GOALS = {"--help": 1.0, "export": 3.0, "one-step run": 5.0}


def commands(folder: Path) -> dict[str, list[str]]:
    """The timed command lines; the export reads the adapter the one-step run of the first round wrote."""
    cli = [sys.executable, "-m", "ether_diffusion.cli"]
    subject = default_subjects_path() / "orange_checkered_star"
    train = [*cli, "train", "--instance_data_dir", str(subject), "--instance_prompt", "a sks star",
             "--max_train_steps", "1", "--output_dir", str(folder / "run"), "--report_to", "none", "--quiet",
             "--no_final_reload", "--pretrained_model_name_or_path", str(default_model_path())]  # fmt: skip
    export = [*cli, "export", str(folder / "adapter.safetensors"), "--model", str(default_model_path()), "--format",
              "kohya", "--output", str(folder / "lora.safetensors"), "--overwrite"]  # fmt: skip
    return {"--help": [*cli, "--help"], "export": export, "one-step run": train}


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each runs every command once)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(args: argparse.Namespace) -> dict[str, dict]:
    """Print the table; returns each command's ``{"median", "min", "max", "stderr"}`` (seconds, and the standard
    error of its last run)."""
    folder = Path(tempfile.mkdtemp(prefix="ether-diffusion-startup-"))
    try:
        lines = commands(folder)
        errors: dict[str, str] = {}

        def run(name: str) -> float:
            if name == "one-step run":
                shutil.rmtree(folder / "run", ignore_errors=True)
            started = time.perf_counter()
            done = subprocess.run(lines[name], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": ""})
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed ({done.returncode}): {done.stderr[-2000:]}")
            errors[name] = done.stderr
            if name == "one-step run":
                shutil.copyfile(folder / "run" / "ether_adapter.safetensors", folder / "adapter.safetensors")
            return seconds

        run("one-step run")  # the export's adapter, and a warm file cache for every command
        times = interleaved(list(lines), args.rounds, run)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {}
    print(f"| command | median s | min–max s | goal | standard error ({args.rounds} interleaved rounds) |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        result[name] = dict(median=statistics.median(values), min=min(values), max=max(values), stderr=errors[name])
        said = "empty" if not errors[name].strip() else f"{len(errors[name].splitlines())} lines"
        print(f"| `{name}` | {result[name]['median']:.2f} | {min(values):.2f}–{max(values):.2f} | "
              f"< {GOALS[name]:g} | {said} |")  # fmt: skip
    return result
