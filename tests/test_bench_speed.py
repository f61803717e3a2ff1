"""The speed benchmark's --quick mode runs end to end (a smoke test: it measures nothing worth keeping)."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("peft", reason="the benchmark compares against PEFT: pip install -e .[dev]")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_speed.py"


@pytest.mark.slow
def test_quick_benchmark_writes_every_section(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_speed", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(bench.parse_args(["--quick", "--output_dir", str(tmp_path)]))
    variants = {row["variant"] for row in result["training"]}
    assert {"floor (frozen + 1 scalar/layer)", "ETHER n=1", "PEFT LoRA r=4", "PEFT OFT (default)"} <= variants
    ether = next(r for r in result["training"] if r["variant"] == "ETHER n=1")
    hra = next(r for r in result["training"] if r["variant"] == "PEFT HRA r=1")
    assert ether["trainable"] == hra["trainable"] > 0  # the same function, the same parameter count
    assert len(result["inference"]) == 7 and all(r["median_s"] > 0 for r in result["inference"])
    assert [r["method"] for r in result["adapters"]] == ["ETHER", "ETHER+ two-sided"]
    report = (tmp_path / "speed_cpu_quick.md").read_text()
    assert "× floor" in report and "load + activate ms" in report
