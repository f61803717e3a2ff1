"""The DreamBooth quality benchmark's --quick mode runs end to end on the shipped model (a smoke test)."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("peft", reason="the benchmark compares against PEFT: pip install -e .[dev]")
pytest.importorskip("matplotlib", reason="the benchmark plots with matplotlib: pip install -e .[dev]")
pytestmark = pytest.mark.slow  # end to end
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_dreambooth_quality.py"


def test_quick_quality_benchmark(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_dreambooth_quality", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(
        [
            "--quick",
            "--subjects",
            "orange_checkered_star",
            "--seeds",
            "0",
            "--lr_scales",
            "1",
            "--output_dir",
            str(tmp_path),
            "--class_root",
            str(tmp_path / "class"),
        ]
    )
    result = bench.main(args)
    assert [r["method"] for r in result["summary"]] == ["ether", "ether_plus", "lora", "oft"]
    params = {r["method"]: r["parameters"] for r in result["summary"]}
    assert params["ether"] < params["ether_plus"] < params["lora"] < params["oft"]  # 10-100× fewer than peers
    assert all(0 <= r["prompt_fidelity"] <= 1 and r["runs"] == 1 for r in result["summary"])
    saved = json.loads((tmp_path / "dreambooth_quality_quick.json").read_text())
    assert len(saved["rows"]) == 4 and (tmp_path / "dreambooth_quality_quick.png").stat().st_size > 1000
