"""Aggregating a benchmark's runs into a table: mean ± standard deviation over units (subjects for DreamBooth,
training seeds for control), a markdown page in the paper's columns, and a plot.

Each unit's value is first averaged over its repeats (a subject's seeds), so a subject run with two seeds does not
weigh twice; runs that diverged are counted, not averaged.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from ..files import atomic_write, write_json
from ..images import open_image
from ..training.artifacts import make_grid
from .metrics import Metric

__all__ = [
    "curve_summary",
    "curves_markdown",
    "format_value",
    "machine",
    "markdown",
    "mean_sd",
    "plot",
    "sample_grid",
    "scores_line",
    "summarise",
    "tradeoff_plot",
    "write_curves",
    "write_result",
]


def mean_sd(values: list[float]) -> dict:
    """``{mean, sd, n}`` of the finite values (sd 0 for one value, NaN for none)."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "n": len(values)}


def summarise(rows: list[dict], metrics: tuple[Metric, ...], order: list[str], unit: str) -> list[dict]:
    """One summary row per (method, lr scale), in ``order`` of methods, then by scale.

    ``rows``: run records with ``method``, ``lr_scale``, ``unit`` (e.g. ``subject``), ``metrics`` and ``diverged``.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row.get("lr_scale")), []).append(row)

    def rank(key):
        method, scale = key
        return (order.index(method) if method in order else len(order), scale if scale is not None else 0.0)

    summary = []
    for (method, scale), group in sorted(groups.items(), key=lambda kv: rank(kv[0])):
        finished = [r for r in group if not r.get("diverged")]
        per_unit: dict = {}
        for row in finished:
            per_unit.setdefault(row[unit], []).append(row)
        values = {}
        for metric in metrics:
            unit_means = []
            for unit_rows in per_unit.values():
                found = [r["metrics"][metric.key] for r in unit_rows if metric.key in r["metrics"]]
                found = [v for v in found if v is not None and math.isfinite(v)]
                if found:
                    unit_means.append(statistics.fmean(found))
            values[metric.key] = mean_sd(unit_means)
        timed = [r["train_seconds"] for r in finished if r.get("timed") and r.get("train_seconds") is not None]
        summary.append(
            dict(
                method=method,
                label=group[0]["label"],
                lr_scale=scale,
                lr=group[0].get("lr"),
                parameters=group[0].get("parameters"),
                runs=len(group),
                units=len(per_unit),
                diverged=len(group) - len(finished),
                metrics=values,
                train_seconds=statistics.fmean(timed) if timed else None,
            )
        )
    return summary


def format_value(stats: dict | None, with_sd: bool = True) -> str:
    if not stats or not stats.get("n"):
        return "—"
    if with_sd and stats["n"] > 1:
        return f"{stats['mean']:.3f} ± {stats['sd']:.3f}"
    return f"{stats['mean']:.3f}"


def _lr_cell(row: dict) -> str:
    if row.get("lr") is None:
        return "—"
    return f"{row['lr']:.0e} (×{row['lr_scale']:g})"


def markdown(result: dict, metrics: tuple[Metric, ...], title: str, unit_name: str) -> str:
    """The result page: how it was run, then one table (trained rows, the base model, the real-data ceiling)."""
    settings = result["settings"]
    lines = [
        f"# {title}",
        "",
        f"Command: `{result['command']}`  ",
        *(
            f"Runs made by: `{c}`  "
            for c in sorted({r["command"] for r in result["rows"] if r.get("command")})
            if c != result["command"]
        ),  # fmt: skip
        f"Machine: {result['machine']}; {result['date']}  ",
        *(f"{line}  " for line in result.get("about", [])),
        f"Metrics: {result['metrics_description']}",
        "",
        f"Values are means ± standard deviation over {unit_name}; `runs` counts the runs of a row, `diverged` the "
        "ones whose loss became non-finite (left out of the means).",
        "",
        "| method | lr (× paper) | trainable | runs | " + " | ".join(m.header for m in metrics) + " | train s |",
        "|---|---|---|---|" + "---|" * len(metrics) + "---|",
    ]
    for row in result["summary"]:
        runs = f"{row['runs']}" + (f" ({row['diverged']} diverged)" if row["diverged"] else "")
        params = "—" if row.get("parameters") is None else f"{row['parameters']:,}"
        seconds = "—" if row.get("train_seconds") is None else f"{row['train_seconds']:.0f}"
        cells = " | ".join(format_value(row["metrics"].get(m.key)) for m in metrics)
        lines.append(f"| {row['label']} | {_lr_cell(row)} | {params} | {runs} | {cells} | {seconds} |")
    for row in result.get("references", []):
        cells = " | ".join(format_value(row["metrics"].get(m.key)) for m in metrics)
        lines.append(f"| {row['label']} | — | — | {row.get('runs', '—')} | {cells} | — |")
    curves = result.get("tradeoff")
    if curves and curves.get("figure"):
        lines += ["", f"Trade-off curves ({curves['x_label']} against {curves['y_label']}, every evaluated step): "
                  f"`{curves['figure']}`, points in `{curves['table']}`."]  # fmt: skip
    figure = result.get("samples_figure")
    if figure:
        where = f" (subject {figure['subject']})" if figure.get("subject") else ""
        lines += ["", f"Samples{where}: `{figure['file']}`, rows top to bottom: {', '.join(figure['rows'])}."]
    lines += ["", f"Settings: `{_compact(settings)}`", ""]
    return "\n".join(lines)


def _compact(settings: dict) -> str:
    import json

    return json.dumps({k: v for k, v in settings.items() if v not in (None, False, [], "")}, default=str)


def plot(result: dict, metrics: tuple[Metric, ...], path: Path, title: str) -> Path:
    """One panel per metric: a bar per table row (mean, ± sd whiskers), the base model dashed and the real-data
    ceiling dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["summary"]
    trained = [r for r in rows if r["method"] != "base"]
    base = next((r for r in rows if r["method"] == "base"), None)
    ceiling = next((r for r in result.get("references", []) if r.get("kind") == "ceiling"), None)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1.5, 3.8), squeeze=False)
    names = [r["label"] + ("" if r.get("lr_scale") in (None, 1.0) else f" ×{r['lr_scale']:g}") for r in trained]
    for axis, metric in zip(axes[0], metrics):
        means = [r["metrics"].get(metric.key, {}).get("mean", float("nan")) for r in trained]
        sds = [r["metrics"].get(metric.key, {}).get("sd", 0.0) for r in trained]
        axis.bar(range(len(trained)), means, yerr=sds, capsize=3, color="#4c72b0")
        if base and base["metrics"].get(metric.key, {}).get("n"):
            axis.axhline(base["metrics"][metric.key]["mean"], color="gray", linestyle="--", label="base model")
        if ceiling and ceiling["metrics"].get(metric.key, {}).get("n"):
            axis.axhline(ceiling["metrics"][metric.key]["mean"], color="black", linestyle=":", label="real images")
        axis.set_xticks(range(len(trained)))
        axis.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        axis.set_title(metric.header + (f"\n(for {metric.stands_for})" if metric.stands_for else ""), fontsize=9)
        lows = [m - s for m, s in zip(means, sds) if math.isfinite(m)]
        lows += [
            r["metrics"][metric.key]["mean"] for r in (base, ceiling) if r and r["metrics"].get(metric.key, {}).get("n")
        ]
        if lows:  # bars start near the lowest value shown (the base model's line included), not at 0
            axis.set_ylim(bottom=max(0.0, min(lows) - 0.1))
        axis.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}"


def scores_line(metrics: dict) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in metrics.items())


def write_result(folder: Path, stem: str, result: dict, metrics: tuple[Metric, ...], title: str, unit: str) -> dict:
    """``<stem>.json`` (every run), ``<stem>.md`` (the table) and ``<stem>.png`` (the plot), each written atomically."""
    folder = Path(folder)
    write_json(folder / f"{stem}.json", result)
    with atomic_write(folder / f"{stem}.md") as tmp:
        tmp.write_text(markdown(result, metrics, title, unit))
    if result["summary"]:
        with atomic_write(folder / f"{stem}.png") as tmp:
            plot(result, metrics, tmp, title)
    return result


def shown_runs(records: list[dict], order: list[str]) -> list[tuple[str, dict]]:
    """One run per method for a samples figure, in ``order``: its lowest seed at ×1 (else its lowest scale)."""
    chosen: dict = {}
    for record in sorted(records, key=lambda r: (r["lr_scale"] not in (None, 1.0), r["lr_scale"] or 0, r["seed"] or 0)):
        chosen.setdefault(record["method"], record)
    return [
        (r["label"] + ("" if r["lr_scale"] in (None, 1.0) else f" ×{r['lr_scale']:g}"), r)
        for r in (chosen[m] for m in order if m in chosen)
    ]


def sample_grid(rows: list[tuple[str, list]], path: Path, cell: int = 128) -> list[str]:
    """One row of images per ``(label, images)`` (PIL images or paths), every image fitted into ``cell`` pixels
    (nearest-neighbour: a 64-pixel world image stays sharp), written atomically; returns the row labels."""
    from PIL import Image

    rows = [(label, images) for label, images in rows if images]
    if not rows:
        return []
    columns = max(len(images) for _, images in rows)
    blank = Image.new("RGB", (cell, cell), "white")
    tiles = []
    for _, images in rows:
        for image in images:
            image = open_image(image) if isinstance(image, (str, Path)) else image.convert("RGB")
            tiles.append(image.resize((cell, cell), Image.NEAREST if image.width < cell else Image.BICUBIC))
        tiles += [blank] * (columns - len(images))
    with atomic_write(path) as tmp:
        make_grid(tiles, columns).save(tmp, format="PNG")
    return [label for label, _ in rows]


# --- trade-off curves -------------------------------------------------------------------------------------------


def curve_summary(rows: list[dict], metrics: tuple[Metric, ...], order: list[str], unit: str, last_step: int
                  ) -> list[dict]:  # fmt: skip
    """One summary row (``summarise``'s, plus ``step``) per (method, lr scale, evaluated step) of the trained runs.

    A run's points are its ``curve`` (``[{step, metrics}, ...]``: the snapshots of ``--eval_steps``, then the last
    step); a run without one is a single point at ``last_step``. Diverged runs and the base model are left out (the
    table counts the diverged ones)."""
    by_step: dict[int, list[dict]] = {}
    for row in rows:
        if row["method"] == "base" or row.get("diverged"):
            continue
        for point in row.get("curve") or [{"step": last_step, "metrics": row["metrics"]}]:
            by_step.setdefault(point["step"], []).append({**row, "metrics": point["metrics"]})
    points = [{**summary, "step": step} for step, group in by_step.items()
              for summary in summarise(group, metrics, order, unit)]  # fmt: skip
    rank = {method: i for i, method in enumerate(order)}
    return sorted(points, key=lambda p: (rank.get(p["method"], len(order)), p["lr_scale"] or 0.0, p["step"]))


def _line_label(row: dict) -> str:
    return row["label"] + ("" if row.get("lr_scale") in (None, 1.0) else f" ×{row['lr_scale']:g}")


def curves_markdown(result: dict, metrics: tuple[Metric, ...], title: str, unit_name: str) -> str:
    """The curve points as a table: every (method, lr scale, step), the base model and the real-image ceiling."""
    tradeoff = result["tradeoff"]
    lines = [
        f"# {title}: trade-off curves",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; {result['date']}  ",
        *(f"{line}  " for line in result.get("about", [])),
        "",
        f"Each row is one point of `{tradeoff['figure']}`: the runs of a method and learning rate evaluated with the "
        f"adapter as it was after `step` steps (`--eval_steps` snapshots of the same runs, and the last step). Values "
        f"are means ± standard deviation over {unit_name}. The plot draws {tradeoff['x_label']} (x) against "
        f"{tradeoff['y_label']} (y): a curve above and to the right of another is better on both. Along one run the "
        "learning-rate schedule is the run's own (a decaying schedule has not decayed at an early step as a shorter "
        "run's would).",
        "",
        "| method | lr (× paper) | step | runs | " + " | ".join(m.header for m in metrics) + " |",
        "|---|---|---|---|" + "---|" * len(metrics),
    ]
    for row in result["curves"]:
        cells = " | ".join(format_value(row["metrics"].get(m.key)) for m in metrics)
        lines.append(f"| {row['label']} | {_lr_cell(row)} | {row['step']} | {row['runs']} | {cells} |")
    for row in [r for r in result["summary"] if r["method"] == "base"] + result.get("references", []):
        cells = " | ".join(format_value(row["metrics"].get(m.key)) for m in metrics)
        lines.append(f"| {row['label']} | — | — | {row.get('runs', '—')} | {cells} |")
    return "\n".join(lines + [""])


def _stats(row: dict | None, key: str) -> tuple[float, float] | None:
    stats = (row or {}).get("metrics", {}).get(key)
    if not stats or not stats.get("n"):
        return None
    return stats["mean"], stats["sd"]


def _axis_label(metric: Metric, role: str) -> str:
    label = metric.header + (f" (for {metric.stands_for})" if metric.stands_for else "")
    return label if role in metric.label else f"{label}: {role}"


def tradeoff_plot(result: dict, x: Metric, y: Metric, path: Path, title: str) -> Path:
    """Subject fidelity ``x`` against prompt fidelity ``y``: one line per (method, lr scale) through its evaluated
    steps (mean, ± sd bars on both axes; the last step labelled with its number, the others too when there is
    room), the base model as a point and the real images' ``x`` as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X"
    lines: dict[tuple, list[dict]] = {}
    for row in result["curves"]:
        lines.setdefault((row["method"], row["lr_scale"]), []).append(row)
    methods = list(dict.fromkeys(method for method, _ in lines))
    scales = sorted({scale for _, scale in lines})
    fig, axis = plt.subplots(figsize=(7.5, 5.2))
    for (method, scale), points in lines.items():
        points = [p for p in sorted(points, key=lambda p: p["step"]) if _stats(p, x.key) and _stats(p, y.key)]
        if not points:
            continue
        (xs, xsd), (ys, ysd) = (zip(*[_stats(p, key) for p in points]) for key in (x.key, y.key))
        colour = colours[methods.index(method) % len(colours)]
        axis.errorbar(xs, ys, xerr=xsd, yerr=ysd, color=colour, marker=markers[scales.index(scale) % len(markers)],
                      markersize=5, linewidth=1.2, elinewidth=0.6, capsize=2, label=_line_label(points[0]))  # fmt: skip
        for point, px, py in zip(points, xs, ys):
            axis.annotate(str(point["step"]), (px, py), textcoords="offset points", xytext=(4, 3), fontsize=6,
                          color=colour)  # fmt: skip
    base = next((r for r in result["summary"] if r["method"] == "base"), None)
    if _stats(base, x.key) and _stats(base, y.key):
        (bx, bxsd), (by, bysd) = _stats(base, x.key), _stats(base, y.key)
        axis.errorbar([bx], [by], xerr=[bxsd], yerr=[bysd], color="black", marker="*", markersize=11, linestyle="",
                      capsize=2, label="base model")  # fmt: skip
    ceiling = next((r for r in result.get("references", []) if r.get("kind") == "ceiling"), None)
    if _stats(ceiling, x.key):
        axis.axvline(_stats(ceiling, x.key)[0], color="black", linestyle=":", label="real images (ceiling)")
    axis.set_xlabel(_axis_label(x, "subject fidelity"))
    axis.set_ylabel(_axis_label(y, "prompt fidelity"))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    axis.set_title(title + "\n(numbers: training step; bars: ± sd over subjects)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def write_curves(folder: Path, stem: str, result: dict, metrics: tuple[Metric, ...], title: str, unit: str) -> None:
    """``<stem>_tradeoff.png`` and ``<stem>_curves.md`` from ``result["curves"]`` and ``result["tradeoff"]`` (the
    axes' metric keys), each written atomically."""
    folder, tradeoff = Path(folder), result["tradeoff"]
    by_key = {m.key: m for m in metrics}
    with atomic_write(folder / tradeoff["table"]) as tmp:
        tmp.write_text(curves_markdown(result, metrics, title, unit))
    with atomic_write(folder / tradeoff["figure"]) as tmp:
        tradeoff_plot(result, by_key[tradeoff["x"]], by_key[tradeoff["y"]], tmp, title)
