"""One table and one trade-off plot over several `ether-diffusion bench dreambooth` folders (the arms of an ablation).

    ether-diffusion bench ablation-table --arm paper=outputs/prompt-drift/paper --arm no-kv=outputs/prompt-drift/nokv \
        --reference outputs/prompt-drift/lora --output outputs/prompt-drift/ablation

Each folder is one arm (its settings apply to every run in it). Every run's points (its ``--eval_steps`` snapshots and
its last step) are read from ``runs/<subject>/<run>/scores.json``; a subject's value is the mean over its training
seeds, a row is the mean ± sd over subjects. ``--reference`` names the folder whose LoRA runs at the paper's rate (×1,
last step) are the bar the defaults are held to (docs/quality.md): every row gets its difference to them, averaged over
the subjects both have (paired), and whether it meets the goal (subject fidelity ≥ LoRA's + 0.02, prompt fidelity ≥
LoRA's − 0.01). Writes ``<output>.md`` (the table) and ``<output>.png`` (subject against prompt fidelity, one line per
arm, method and learning rate through its steps; the base model and LoRA as markers).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

SUBJECT, PROMPT = "subject_fidelity", "prompt_fidelity"
GOAL = (0.02, -0.01)  # the bar: subject >= LoRA + 0.02, prompt >= LoRA - 0.01


def _points(scores: dict) -> list[tuple[int, dict]]:
    curve = scores.get("curve") or [{"step": scores["steps"], "metrics": scores["metrics"]}]
    return [(point["step"], point["metrics"]) for point in curve]


def read_folder(folder: Path) -> tuple[dict, dict]:
    """``({(method, lr_scale, step): {subject: [(subject fid., prompt fid.) per seed]}}, {subject: base (s, p)})``."""
    runs: dict = defaultdict(lambda: defaultdict(list))
    base = {}
    for path in sorted(folder.glob("runs/*/*/scores.json")):
        scores = json.loads(path.read_text())
        subject = path.parent.parent.name
        if path.parent.name == "base":
            base[subject] = (scores["metrics"][SUBJECT], scores["metrics"][PROMPT])
            continue
        if scores.get("diverged"):
            continue
        for step, metrics in _points(scores):
            runs[(scores["method"], scores["lr_scale"], step)][subject].append((metrics[SUBJECT], metrics[PROMPT]))
    return runs, base


def read_folders(folders: list[Path]) -> tuple[dict, dict]:
    """``read_folder`` over several folders of one arm (e.g. one per training seed), their runs pooled."""
    runs: dict = defaultdict(lambda: defaultdict(list))
    base = {}
    for folder in folders:
        found, found_base = read_folder(folder)
        base.update(found_base)
        for key, seeds in found.items():
            for subject, values in seeds.items():
                runs[key][subject].extend(values)
    return runs, base


def per_subject(seeds: dict) -> dict:
    return {s: tuple(statistics.mean(v[i] for v in values) for i in (0, 1)) for s, values in seeds.items()}


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def build(
    arms: list[tuple[str, list[Path]]], reference: list[Path] | None
) -> tuple[list[dict], dict, dict | None, int]:
    rows, bases = [], {}
    for name, folders in arms:
        runs, base = read_folders(folders)
        bases.update(base)
        for (method, scale, step), seeds in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
            rows.append({"arm": name, "method": method, "lr_scale": scale, "step": step, "subjects": per_subject(seeds),
                         "runs": sum(len(v) for v in seeds.values())})  # fmt: skip
    lora, lora_runs = None, 0
    if reference:
        runs, base = read_folders(reference)
        bases.update(base)
        last = max((step for (method, scale, step) in runs if method == "lora" and scale == 1), default=None)
        if last is not None:
            lora = per_subject(runs[("lora", 1, last)])
            lora_runs = sum(len(v) for v in runs[("lora", 1, last)].values())
    return rows, bases, lora, lora_runs


def table(rows: list[dict], bases: dict, lora: dict | None, lora_runs: int = 0) -> str:
    lines = [
        "| arm | method | lr × paper | step | subjects | runs | subject fidelity ↑ | prompt fidelity ↑ "
        "| Δ subject vs LoRA | Δ prompt vs LoRA | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def line(arm, method, scale, step, subjects, runs):
        s = [v[0] for v in subjects.values()]
        p = [v[1] for v in subjects.values()]
        delta, goal = "— | —", "—"
        shared = sorted(set(subjects) & set(lora or {}))
        if lora and shared and method != "lora (reference)":
            ds = statistics.mean(subjects[k][0] - lora[k][0] for k in shared)
            dp = statistics.mean(subjects[k][1] - lora[k][1] for k in shared)
            delta = f"{ds:+.3f} | {dp:+.3f}"
            goal = "yes" if ds >= GOAL[0] and dp >= GOAL[1] else "no"
        lines.append(f"| {arm} | {method} | {scale} | {step} | {len(subjects)} | {runs} | {_mean_sd(s)} | "
                     f"{_mean_sd(p)} | {delta} | {goal} |")  # fmt: skip

    if bases:
        line("—", "base model", "—", 0, bases, "—")
    if lora:
        line("reference", "lora (reference)", 1, "last", lora, lora_runs)
    for row in rows:
        line(row["arm"], row["method"], row["lr_scale"], row["step"], row["subjects"], row["runs"])
    return "\n".join(lines)


def plot(rows: list[dict], bases: dict, lora: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(11, 6.5))
    lines = defaultdict(list)
    for row in rows:
        lines[(row["arm"], row["method"], row["lr_scale"])].append(row)
    colours = plt.get_cmap("tab20").colors
    styles = {"ether": "--", "ether_plus": "-", "lora": ":", "oft": "-."}
    for i, ((arm, method, scale), points) in enumerate(lines.items()):
        points.sort(key=lambda r: r["step"])
        xs = [statistics.mean(v[0] for v in r["subjects"].values()) for r in points]
        ys = [statistics.mean(v[1] for v in r["subjects"].values()) for r in points]
        axes.plot(xs, ys, marker="o", color=colours[i % len(colours)], linestyle=styles.get(method, "-"),
                  label=f"{arm}: {method} ×{scale}")  # fmt: skip
        axes.annotate(str(points[-1]["step"]), (xs[-1], ys[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for values, label, marker in ((bases, "base model", "*"), (lora, "LoRA r=4, paper rate", "s")):
        if values:
            axes.scatter([statistics.mean(v[0] for v in values.values())],
                         [statistics.mean(v[1] for v in values.values())], marker=marker, s=150, color="black",
                         label=label, zorder=5)  # fmt: skip
    if lora:
        x = statistics.mean(v[0] for v in lora.values()) + GOAL[0]
        y = statistics.mean(v[1] for v in lora.values()) + GOAL[1]
        axes.axvline(x, color="grey", linestyle=":", linewidth=1)
        axes.axhline(y, color="grey", linestyle=":", linewidth=1)
        axes.text(x, y, " goal: above and right", fontsize=8, color="grey", va="bottom")
    axes.set_xlabel("subject fidelity (mean over subjects) →")
    axes.set_ylabel("prompt fidelity (mean over subjects) →")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The flags, and ``args.arms`` (``[(name, [folder, ...])]``) and ``args.reference_folders`` read from them."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arm", action="append", required=True, metavar="NAME=FOLDER[,FOLDER...]",
        help="an arm's bench folder; several, comma-separated, pool their runs (e.g. one folder per training seed)",
    )  # fmt: skip
    parser.add_argument(
        "--reference", help="the folder(s) holding LoRA's paper-rate runs (the goal's bar), comma-separated"
    )
    parser.add_argument("--output", type=Path, required=True, help="writes OUTPUT.md and OUTPUT.png")
    args = parser.parse_args(argv)
    args.arms = []
    for spec in args.arm:
        name, _, folders = spec.partition("=")
        paths = [Path(folder) for folder in folders.split(",") if folder]
        if not name or not paths or not all((path / "runs").is_dir() for path in paths):
            parser.error(f"--arm {spec!r}: give NAME=FOLDER[,FOLDER], bench dreambooth output folders (with runs/)")
        args.arms.append((name, paths))
    args.reference_folders = (
        [Path(folder) for folder in args.reference.split(",") if folder] if args.reference else None
    )
    return args


def main(args: argparse.Namespace) -> str:
    """Write ``<output>.md`` and ``<output>.png``; returns the table."""
    rows, bases, lora, lora_runs = build(args.arms, args.reference_folders)
    text = table(rows, bases, lora, lora_runs)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text(text + "\n")
    plot(rows, bases, lora, args.output.with_suffix(".png"))
    print(text)
    return text
