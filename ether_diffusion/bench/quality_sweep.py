"""Draw the learning-rate sweep of docs/quality.md from its JSON: mean ± sample standard deviation over the runs of
each (method, learning-rate scale), the spread the table gives, with the base model and the instance-image ceiling.

    ether-diffusion bench quality-sweep docs/benchmarks/dreambooth_quality.json docs/benchmarks/dreambooth_quality.png

``sweep`` is the one summary of those runs: the plot draws it, and the tests hold docs/quality.md's table to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

LABELS = {"ether": "ETHER", "ether_plus": "ETHER+ (two-sided)", "lora": "LoRA r=4 (PEFT)", "oft": "OFT (PEFT)"}
PANELS = (("subject_fidelity", "subject fidelity ↑"), ("prompt_fidelity", "prompt fidelity ↑"))


def sweep(rows: list[dict]) -> dict[str, dict[str, list[tuple[float, float, float, int]]]]:
    """``{metric: {method: [(lr scale, mean, sd, runs), ...]}}`` over the runs whose loss stayed finite."""
    groups = defaultdict(list)
    for row in rows:
        if row.get("losses_finite", True):
            groups[(row["method"], float(row["lr_scale"]))].append(row)
    found: dict = {metric: defaultdict(list) for metric, _ in PANELS}
    for (method, scale), runs in sorted(groups.items(), key=lambda item: (list(LABELS).index(item[0][0]), item[0][1])):
        for metric, _ in PANELS:
            values = [run[metric] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            found[metric][method].append((scale, statistics.mean(values), spread, len(values)))
    return found


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, help="the benchmark JSON (rows of runs, and the base model)")
    parser.add_argument("output", type=Path, help="the PNG to write")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(
            f"{args.results} does not exist: give the benchmark JSON (e.g. docs/benchmarks/dreambooth_quality.json)"
        )
    return args


def main(args: argparse.Namespace) -> Path:
    """Draw the two panels into ``args.output`` (written whole or not at all); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(args.results.read_text())
    curves = sweep(data["rows"])
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, (metric, title) in zip(axes, PANELS):
        for method, points in curves[metric].items():
            scales, means, spreads, _ = zip(*points)
            low = [m - s for m, s in zip(means, spreads)]
            high = [m + s for m, s in zip(means, spreads)]
            (line,) = axis.plot(scales, means, marker="o", label=LABELS.get(method, method))
            axis.fill_between(scales, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        base = data.get("base") or {}
        if metric in base:
            axis.axhline(base[metric], color="grey", linestyle="--", label="base model")
        if metric == "subject_fidelity" and "instance_ceiling" in base:
            axis.axhline(base["instance_ceiling"], color="black", linestyle=":", label="instance images (ceiling)")
        axis.set_xscale("log")
        axis.set_xlabel("learning rate / paper's")
        axis.set_title(f"{title} (mean ± sd over runs)")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".partial.png")
    figure.savefig(tmp, dpi=100)
    tmp.replace(args.output)
    print(f"wrote {args.output}")
    return args.output
