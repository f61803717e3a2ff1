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
