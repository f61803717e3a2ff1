"""The speed benchmark's --quick mode runs end to end (a smoke test: it measures nothing worth keeping) without
writing into the checkout, and its interleaving and summaries are what the report says they are."""

import tempfile
from pathlib import Path

import pytest
import torch

from ether_diffusion.bench import host
from ether_diffusion.bench import speed as bench
from ether_diffusion.bench.timing import interleaved, spread

pytest.importorskip("peft", reason="the benchmark compares against PEFT: pip install -e .[dev]")
ROOT = Path(__file__).resolve().parents[1]


def test_every_round_visits_every_variant_once_in_rotated_order():
    order = []
    results = interleaved(["a", "b", "c"], 4, lambda name: order.append(name) or len(order))
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    # results stay in round order per variant, so index r pairs visits of the same round
    assert results == {"a": [1, 6, 8, 10], "b": [2, 4, 9, 11], "c": [3, 5, 7, 12]}


def test_spread_reports_median_range_and_quartiles():
    assert spread([3.0, 1.0, 2.0, 10.0, 4.0]) == dict(median=3.0, min=1.0, max=10.0, q1=2.0, q3=4.0)
    assert spread([2.0]) == dict(median=2.0, min=2.0, max=2.0, q1=2.0, q3=2.0)


def test_the_cuda_profile_covers_the_gpu_rows_of_issues_18_and_25():
    args = bench.parse_args(["--device", "cuda"])
    assert args.dtype == "bf16" and args.sizes == [64] and args.batches == [1, 4] and args.sdxl_size == 128
    assert args.sections == ["training", "sync", "sdxl", "inference", "compiled", "compile", "pack", "captured"]
    assert args.steps == 25
    assert args.compile_backend == "inductor"
    assert [bench.VARIANTS[key].label for key in args.variants] == [
        "floor (frozen + 1 scalar/layer)",
        "ETHER n=1",
        "ETHER+ two-sided n=1",
        "PEFT LoRA r=4",
    ]
    assert bench.parse_args(["--device", "cpu", "--variants", "lora", "ether1"]).variants == ["floor", "lora", "ether1"]


def test_a_quick_run_writes_into_a_new_temporary_folder_and_a_measurement_into_docs(tmp_path, monkeypatch):
    quick = bench.parse_args(["--quick"])
    first, second = bench.output_folder(quick), bench.output_folder(quick)
    try:
        assert first != second and first.is_dir() and not any(first.iterdir())
        assert first.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
        assert not first.resolve().is_relative_to(ROOT)
    finally:
        first.rmdir()
        second.rmdir()
    assert bench.output_folder(bench.parse_args(["--quick", "--output_dir", str(tmp_path / "q")])) == tmp_path / "q"
    assert (tmp_path / "q").is_dir()
    monkeypatch.chdir(tmp_path)
    assert bench.output_folder(bench.parse_args([])) == Path("docs/benchmarks")
    assert (tmp_path / "docs" / "benchmarks").is_dir()
    assert bench.parse_args(["--quick"], prog="ether-diffusion bench speed").command == (
        "ether-diffusion bench speed --quick"
    )


@pytest.mark.slow
def test_quick_benchmark_writes_every_section(tmp_path):
    result = bench.main(
        bench.parse_args(["--quick", "--sections", "training", "inference", "adapters", "--output_dir", str(tmp_path)])
    )
    variants = {row["variant"] for row in result["training"]}
    assert {"floor (frozen + 1 scalar/layer)", "ETHER n=1", "PEFT LoRA r=4", "PEFT OFT (default)"} <= variants
    assert all(len(row["times"]) == 2 for row in result["training"])  # two rounds
    floor = next(r for r in result["training"] if r["key"] == "floor")
    assert floor["ratio"] == dict(median=1.0, min=1.0, max=1.0, q1=1.0, q3=1.0)
    ether = next(r for r in result["training"] if r["variant"] == "ETHER n=1")
    hra = next(r for r in result["training"] if r["variant"] == "PEFT HRA r=1")
    assert ether["trainable"] == hra["trainable"] > 0  # the same function, the same parameter count
    assert len(result["inference"]) == 7 and all(r["time"]["median"] > 0 for r in result["inference"])
    assert [r["method"] for r in result["adapters"]] == ["ETHER", "ETHER+ two-sided"]
    report = (tmp_path / "speed_cpu_quick.md").read_text()
    assert "× floor" in report and "load + activate ms" in report and "interleaved rounds" in report


@pytest.mark.slow
def test_quick_run_of_the_cuda_rows_on_the_cpu(tmp_path):
    """The GPU script's rows (SD-1.5 and SDXL with gradient checkpointing, the sync check, sampling) on tiny UNets."""
    args = bench.parse_args(
        [
            "--quick",
            "--device",
            "cpu",
            "--profile",
            "cuda",
            "--compile_backend",
            "aot_eager",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert args.sections == list(bench.SECTIONS)
    args.sections = ["training", "sync", "sdxl", "inference", "compiled", "compile", "pack"]
    result = bench.main(args)
    pack = result["pack"]  # K runs per step: K ETHER+ adapters routed per sample, each run's own AdamW
    assert [(r["pack"], r["batch"]) for r in pack] == [(1, 2), (8, 16)] and pack[0]["ratio"]["median"] == 1.0
    assert all(r["per_hour"] > 0 and len(r["times"]) == 2 for r in pack)
    sdxl = result["sdxl"]
    assert [r["key"] for r in sdxl] == bench.ISSUE_VARIANTS and all(r["checkpointing"] for r in sdxl)
    assert all(r["model"] == "SDXL UNet (tiny)" and r["peak_extra_mb"]["median"] >= 0 for r in sdxl)
    assert [r["key"] for r in result["training"]] == bench.ISSUE_VARIANTS
    checks = {(r["variant"], r["check"].split(", ")[-1]) for r in result["sync"]}
    assert ("ETHER+ two-sided n=1", "training forward + backward") in checks
    assert all(r["result"] == "not checkable on cpu" for r in result["sync"])  # CUDA's sync debug mode only
    assert {r["variant"] for r in result["inference"]} >= {"base", "ETHER fused", "ETHER+ two-sided unfused"}
    report = (tmp_path / "speed_cpu_quick.md").read_text()
    assert "SDXL UNet (tiny) (gradient checkpointing)" in report and "Host-device synchronisation" in report
    assert "K runs per training step (`train --jobs`): adapters per hour" in report
    blocks = result["compiled"]
    assert [r["key"] for r in blocks] == ["floor", "ether1", "etherplus1"] and blocks[0]["ratio"]["median"] == 1.0
    assert all(r["time"]["median"] > 0 and r["compile_s"] > 0 and len(r["times"]) == 2 for r in blocks)
    compiled = result["compile"]
    assert [r["variant"] for r in compiled] == ["ETHER n=1", "ETHER+ two-sided n=1"]
    assert all(r["result"].startswith("compiled, no graph break") and r["layers"] > 0 for r in compiled), compiled
    assert "torch.compile(fullgraph=True) of the adapted layers" in report
    with pytest.raises(RuntimeError, match="the captured step is a CUDA graph: this section needs --device cuda"):
        bench.bench_captured_training(None, args, None, torch.device("cpu"), torch.float32)


def test_the_captured_rows_have_a_table():
    timing = dict(time=dict(median=0.01, min=0.009, max=0.012), ratio=dict(median=0.3, min=0.28, max=0.33))
    rows = [dict(model="SD-1.5 UNet", size=64, batch=1, variant=name, first_s=2.0, trainable=1, **timing)
            for name in bench.CAPTURED]  # fmt: skip
    rows.append(dict(check="ETHER n=1 after 100 steps, captured vs eager", max_difference=1e-3, max_change=0.2))
    header = dict(machine="m", command="c", date="d", rounds=2, steps_per_visit=1, warmup=1, clock="wall")
    report = bench.markdown(dict(device="cuda", dtype="bf16", captured=rows, **header))
    assert "## Training step captured as a CUDA graph (--cuda_graphs)" in report
    assert "| SD-1.5 UNet | 64² | 1 | captured ETHER n=1 | 10.0 |" in report
    assert "captured vs eager: largest difference 1.00e-03" in report


def test_host_overhead_benchmark_runs_every_variant_interleaved():
    threads = torch.get_num_threads()
    try:
        per_layer = host.main(host.parse_args(["--layers", "3", "--width", "8", "--rounds", "2", "--steps", "1"]))
        assert torch.get_num_threads() == threads  # timed on one thread, the caller's setting given back
    finally:
        torch.set_num_threads(threads)
    assert list(per_layer) == ["floor", "ether", "ether_plus", "lora"] and per_layer["floor"] == 0.0
    ether = host.build("ether_plus", 2, 8)
    assert sum(p.numel() for p in ether.parameters() if p.requires_grad) == 2 * 4 * 8  # u, v on both sides
