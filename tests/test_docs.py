"""Every documentation file the code and the docs point to exists (pipeline.py once cited a docs/strength.md)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"(?<![\w/])((?:docs|assets|scripts)/[\w./-]*\w)(?![\w./<*-])")  # not templates or globs


def test_referenced_files_exist():
    sources = [*ROOT.glob("ether_diffusion/**/*.py"), *ROOT.glob("docs/*.md"), ROOT / "README.md"]
    missing = sorted(
        f"{source.relative_to(ROOT)}: {reference}"
        for source in sources
        for reference in REFERENCE.findall(source.read_text(encoding="utf-8"))
        if not (ROOT / reference).exists()
    )
    assert len(sources) > 20
    assert not missing, missing


def test_the_quality_plot_spreads_are_the_tables(tmp_path):
    """docs/quality.md's plot draws mean ± sd per row from the same JSON as its table: they agree."""
    import json

    from ether_diffusion.bench.quality_sweep import LABELS, sweep
    from ether_diffusion.cli import main

    results = ROOT / "docs/benchmarks/dreambooth_quality.json"
    curves = sweep(json.loads(results.read_text())["rows"])
    rows = {}  # (label, scale) -> (runs, subject fidelity cell, prompt fidelity cell), from the page's table
    for line in (ROOT / "docs/quality.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and (scale := re.search(r"\(×([\d.]+)\)", cells[1])):
            rows[(cells[0], float(scale.group(1)))] = (int(cells[2]), cells[4], cells[5])
    compared = 0
    for method, points in curves["subject_fidelity"].items():
        for (scale, subject, subject_sd, runs), (_, prompt, prompt_sd, _) in zip(
            points, curves["prompt_fidelity"][method]
        ):
            assert rows[(LABELS[method], scale)] == (
                runs,
                f"{subject:.3f} ± {subject_sd:.3f}",
                f"{prompt:.3f} ± {prompt_sd:.3f}",
            )
            compared += 1
    assert compared == 16
    out = tmp_path / "plot.png"
    assert main(["bench", "quality-sweep", str(results), str(out)]) == 0
    assert out.stat().st_size > 10_000
