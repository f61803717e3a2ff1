"""The benchmark commands end to end on the tiny world, in their short mode (``--quick``): the DreamBooth benchmark
interrupted mid-run and resumed, the control benchmark, and the DINO / CLIP code path through the driver."""

from __future__ import annotations

import json

import pytest
from conftest import build_metric_models

from ether_diffusion.bench.dataset import WORLD_TEMPLATES
from ether_diffusion.cli import main
from ether_diffusion.training.callbacks import Callback

pytest.importorskip("peft", reason="the benchmarks compare against PEFT: pip install -e .[dev]")
pytest.importorskip("matplotlib", reason="the benchmarks plot with matplotlib: pip install -e .[dev]")
pytestmark = pytest.mark.slow
SUBJECT = "orange_checkered_star"


class StopSecondRun(Callback):
    """Asks the loop to stop after the first step of the second run it sees (a Ctrl-C between checkpoints)."""

    def __init__(self):
        self.starts, self.step = [], 0

    def on_train_start(self, total_steps, start_step):
        self.starts.append(start_step)
        self.step = 0

    def on_step(self, step, logs):
        self.step = step

    def should_stop(self):
        return len(self.starts) == 2 and self.step >= 1


def test_dreambooth_bench_runs_end_to_end_and_resumes_where_it_stopped(tmp_path, capsys):
    from ether_diffusion.bench.dreambooth import DreamBoothBenchConfig, run_dreambooth_bench
    from ether_diffusion.bench.runs import BenchInterrupted
    from ether_diffusion.training.dreambooth import DreamBoothTask

    data, out = tmp_path / "tiny-dreambooth", tmp_path / "bench"
    assert main(["bench", "export-world", "--output", str(data)]) == 0
    args = ["--dataset", str(data), "--subjects", SUBJECT, "--methods", "ether_plus", "lora", "--quick",
            "--checkpointing_steps", "1", "--eval_steps", "1", "--output_dir", str(out), "--quiet"]  # fmt: skip
    stop = StopSecondRun()
    with pytest.raises(BenchInterrupted, match="stopped at step 1 .*rerun the same command"):
        run_dreambooth_bench(DreamBoothBenchConfig.from_args(args), callbacks=[stop])
    runs = out / "runs" / SUBJECT
    ether, lora = runs / "ether_plus-x1-seed0", runs / "lora-x1-seed0"
    assert (runs / "base" / "scores.json").is_file() and (ether / "scores.json").is_file()
    assert sorted(p.name for p in (ether / "samples").iterdir()) == [
        "00-seed1000.png", "00-seed1001.png", "01-seed1000.png", "01-seed1001.png"]  # fmt: skip
    assert not (ether / "train" / "checkpoint-1").exists()  # a finished run keeps its adapter, not its checkpoints
    assert not (lora / "scores.json").exists() and (lora / "train" / "checkpoint-1").is_dir()
    weights = DreamBoothTask.weight_name
    assert (ether / "train" / weights).is_file()
    assert not (lora / "train" / weights).exists()  # the stopped run is not taken for a finished one
    # --eval_steps 1: the adapter after step 1, saved while training (the stopped run's too), sampled when finished
    snapshot = f"snapshots/step-1/{weights}"
    assert (ether / snapshot).is_file() and len(list((ether / "snapshots/step-1/samples").iterdir())) == 4
    assert (lora / snapshot).is_file() and not (lora / "snapshots/step-1/samples").exists()
    lora_snapshot = (lora / snapshot).stat().st_mtime_ns
    class_images = sorted((out / "class_images" / "star").iterdir())
    assert len(class_images) == 2
    done = {p: p.stat().st_mtime_ns for p in [ether / "scores.json", ether / "train.json", *class_images]}

    # the same command, from the command line: the finished runs are read back, the stopped one resumes
    assert main(["bench", "dreambooth", *args]) == 0
    assert {p: p.stat().st_mtime_ns for p in done} == done
    resumed = json.loads((lora / "train.json").read_text())
    assert (resumed["resumed_from_step"], resumed["steps"], resumed["timed"]) == (1, 2, False)
    assert (lora / snapshot).stat().st_mtime_ns == lora_snapshot  # step 1 was not trained again
    for run in (ether, lora):  # every point of the run sampled and scored like the final adapter
        record = json.loads((run / "scores.json").read_text())
        assert [p["step"] for p in record["curve"]] == [1, 2] and record["curve"][1]["metrics"] == record["metrics"]
        assert record["curve"][0]["images"] == 4 and set(record["curve"][0]["metrics"]) == set(record["metrics"])
    result = json.loads((out / "dreambooth.json").read_text())
    assert result["command"].startswith("ether-diffusion bench dreambooth --dataset")
    assert [(r["method"], r["units"], r["runs"]) for r in result["summary"]] == [
        ("base", 1, 1), ("ether_plus", 1, 1), ("lora", 1, 1)]  # fmt: skip
    params = {r["method"]: r["parameters"] for r in result["summary"]}
    assert 0 == params["base"] < params["ether_plus"] < params["lora"]
    for row in result["summary"]:
        assert set(row["metrics"]) == {"subject_fidelity", "prompt_fidelity", "diversity"}
        assert (
            0 <= row["metrics"]["prompt_fidelity"]["mean"] <= 1
            and -1 <= row["metrics"]["subject_fidelity"]["mean"] <= 1
        )
    assert result["references"][0]["metrics"]["subject_fidelity"]["mean"] > 0.9  # the instance images to each other
    table = (out / "dreambooth.md").read_text()
    assert "| subject fidelity ↑ | prompt fidelity ↑ | diversity |" in table and "real images (to each other)" in table
    assert (out / "dreambooth.png").stat().st_size > 5000
    assert result["samples_figure"]["rows"] == ["real images", "base model (no adapter)", "ETHER+ (two-sided)",
                                                "LoRA r=4 (PEFT)"]  # fmt: skip
    assert "Samples (subject orange_checkered_star): `dreambooth_samples.png`" in table
    from PIL import Image

    assert Image.open(out / "dreambooth_samples.png").size == (5 * 128, 4 * 128)  # 5 real images wide, 4 rows
    assert "table:" in capsys.readouterr().out
    assert [(c["method"], c["step"], c["units"]) for c in result["curves"]] == [
        ("ether_plus", 1, 1), ("ether_plus", 2, 1), ("lora", 1, 1), ("lora", 2, 1)]  # fmt: skip
    assert result["tradeoff"]["x"] == "subject_fidelity" and result["tradeoff"]["y"] == "prompt_fidelity"
    assert (out / "dreambooth_tradeoff.png").stat().st_size > 5000
    curves = (out / "dreambooth_curves.md").read_text()
    assert "| LoRA r=4 (PEFT) | 6e-04 (×1) | 1 | 1 |" in curves and "| base model (no adapter) | — | — | 1 |" in curves
    assert "Trade-off curves (subject fidelity against prompt fidelity" in table

    # records of the wrong shape (valid JSON, not a record) count as absent: the run is scored again, and said
    (ether / "scores.json").write_text("[]")
    (ether / "train.json").write_text('{"train_seconds": "slow", "timed": true}')
    capsys.readouterr()
    assert main(["bench", "dreambooth", *args]) == 0
    out_text = capsys.readouterr().out
    assert f"'{ether / 'scores.json'}' is not a run record (it holds a JSON list, not an object)" in out_text
    assert f"'{ether / 'train.json'}' is not a training record" in out_text
    rescored = json.loads((ether / "scores.json").read_text())
    assert rescored["metrics"] == json.loads((out / "dreambooth.json").read_text())["rows"][1]["metrics"]
    assert rescored["train_seconds"] is None and [p["step"] for p in rescored["curve"]] == [1, 2]

    # other settings in the same folder would mix incomparable runs: refused, naming the setting
    assert main(["bench", "dreambooth", *args, "--eval_seed", "7"]) == 2
    assert "eval_seed: 1000 there, 7 now" in capsys.readouterr().err
    at = args.index("--eval_steps")
    assert main(["bench", "dreambooth", *args[:at], *args[at + 2 :]]) == 2  # the runs have their snapshots
    assert "eval_steps: [1] there, None now" in capsys.readouterr().err


def test_dreambooth_bench_packs_its_ether_runs(tmp_path, capsys):
    """--pack (default 8): the ETHER runs of a subject train side by side, one pack per adapter layout, each into its
    own folder with its training record and --eval_steps snapshot; the LoRA runs train alone; the adapters are those
    of --pack 1."""
    from safetensors.torch import load_file

    data = tmp_path / "tiny-dreambooth"
    assert main(["bench", "export-world", "--output", str(data)]) == 0
    args = ["--dataset", str(data), "--subjects", SUBJECT, "--methods", "ether", "ether_plus", "lora", "--seeds", "0",
            "1", "--quick", "--eval_steps", "1", "--quiet"]  # fmt: skip
    assert main(["bench", "dreambooth", *args, "--output_dir", str(tmp_path / "packed")]) == 0
    assert "training 4 runs 8 per step" in capsys.readouterr().out
    assert main(["bench", "dreambooth", *args, "--pack", "1", "--output_dir", str(tmp_path / "alone")]) == 0
    for run in ("ether-x1-seed0", "ether-x1-seed1", "ether_plus-x1-seed0", "ether_plus-x1-seed1", "lora-x1-seed0"):
        packed, alone = tmp_path / "packed" / "runs" / SUBJECT / run, tmp_path / "alone" / "runs" / SUBJECT / run
        record = json.loads((packed / "scores.json").read_text())
        assert record.get("packed") == (None if run.startswith("lora") else 8), run
        assert [p["step"] for p in record["curve"]] == [1, 2]  # the step-1 snapshot, written while it trained
        assert record["steps"] == 2 and record["train_seconds"] > 0
        a = load_file(next((packed / "train").glob("*.safetensors")))
        b = load_file(next((alone / "train").glob("*.safetensors")))
        # float32 rounding of a batch of several runs, as AdamW's first steps carry it: an entry whose gradient is
        # near zero can move by up to the learning rate either way (measured: 9e-5 against entries up to 0.15)
        scale = max(float(v.abs().max()) for v in b.values())
        assert max(float((a[k] - b[k]).abs().max()) for k in b) < 2e-3 * scale, run
    result = json.loads((tmp_path / "packed" / "dreambooth.json").read_text())
    assert [(r["method"], r["runs"]) for r in result["summary"]] == [("base", 1), ("ether", 2), ("ether_plus", 2),
                                                                      ("lora", 2)]  # fmt: skip


def test_control_bench_runs_end_to_end(tmp_path, capsys):
    data, out = tmp_path / "tiny-control", tmp_path / "bench"
    assert main(["bench", "export-world", "--control", "segmentation", "--output", str(data), "--train_scenes",
                 "8", "--eval_scenes", "4"]) == 0  # fmt: skip
    assert json.loads((data / "eval" / "metadata.jsonl").read_text().splitlines()[0])["mask"].startswith("masks/")
    args = ["bench", "control", "--train_data_dir", str(data / "train"), "--eval_data_dir", str(data / "eval"),
            "--methods", "encoder", "ether_plus", "--quick", "--output_dir", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    result = json.loads((out / "control.json").read_text())
    assert [r["method"] for r in result["summary"]] == ["base", "encoder", "ether_plus"]
    params = {r["method"]: r["parameters"] for r in result["summary"]}
    assert params["encoder"] == 99_760 and params["ether_plus"] == 99_760 + 25_664  # encoder + adapter (tiny model)
    for row in result["summary"]:
        assert set(row["metrics"]) == {"miou", "pixel_accuracy", "prompt_fidelity", "fd"}
        assert 0 <= row["metrics"]["miou"]["mean"] <= 1
    real = result["references"][0]
    assert real["label"] == "real targets (mask column)" and real["metrics"]["miou"]["mean"] > 0.9
    rows = {r["method"]: r for r in result["rows"]}
    assert len(list((out / "runs" / "all" / "ether_plus-x1-seed0" / "samples").iterdir())) == rows["ether_plus"][
        "images"] == 4  # fmt: skip
    assert "| mIoU ↑ | pixel acc ↑ | prompt fidelity ↑ | FD ↓ |" in (out / "control.md").read_text()
    assert result["samples_figure"]["rows"] == ["control", "real target", "base model (no control)", "encoder only",
                                                "ETHER+ (two-sided)"]  # fmt: skip
    assert main(args) == 0  # everything finished: nothing trains again
    assert json.loads((out / "control.json").read_text())["rows"] == result["rows"]


def test_control_bench_packs_its_adapter_runs(tmp_path, capsys):
    """--pack 8: the ETHER and ETHER+ runs train side by side (a pack per layout), each with its own condition
    encoder, into its own folder with its training record; the encoder-only run trains alone; every file is the one
    of the default --pack 1 (to float32 rounding)."""
    from safetensors.torch import load_file

    data = tmp_path / "tiny-control"
    assert main(["bench", "export-world", "--control", "segmentation", "--output", str(data), "--train_scenes",
                 "8", "--eval_scenes", "4"]) == 0  # fmt: skip
    args = ["bench", "control", "--train_data_dir", str(data / "train"), "--eval_data_dir", str(data / "eval"),
            "--methods", "encoder", "ether", "ether_plus", "--seeds", "0", "1", "--quick", "--quiet"]  # fmt: skip
    assert main([*args, "--pack", "8", "--output_dir", str(tmp_path / "packed")]) == 0
    assert "training 4 runs 8 per step" in capsys.readouterr().out
    assert main([*args, "--output_dir", str(tmp_path / "alone")]) == 0
    assert "per step" not in capsys.readouterr().out
    for run in ("ether-x1-seed0", "ether-x1-seed1", "ether_plus-x1-seed0", "ether_plus-x1-seed1", "encoder-seed0"):
        packed, alone = tmp_path / "packed" / "runs" / "all" / run, tmp_path / "alone" / "runs" / "all" / run
        record = json.loads((packed / "scores.json").read_text())
        assert record.get("packed") == (None if run.startswith("encoder") else 8), run
        a = load_file(next((packed / "train").glob("*.safetensors")))
        b = load_file(next((alone / "train").glob("*.safetensors")))
        assert any(k.startswith("condition_encoder.") for k in b)
        scale = max(float(v.abs().max()) for v in b.values())
        assert max(float((a[k] - b[k]).abs().max()) for k in b) < 2e-3 * scale, run
    result = json.loads((tmp_path / "packed" / "control.json").read_text())
    assert [(r["method"], r["runs"]) for r in result["summary"]] == [("base", 1), ("encoder", 2), ("ether", 2),
                                                                      ("ether_plus", 2)]  # fmt: skip


def test_dino_clip_metrics_through_the_driver_score_the_class_noun_prompts(tmp_path):
    """The real DINO / CLIP path of the benchmark (tiny random-weight models from configs): the scores written for a
    run are those of its saved samples, and CLIP-T compares them with the prompts without the identifier."""
    from ether_diffusion.bench.metrics import ClipEncoder, DinoEncoder
    from ether_diffusion.images import open_image

    dino_dir, clip_dir = build_metric_models(tmp_path)
    data, out = tmp_path / "tiny-dreambooth", tmp_path / "bench"
    assert main(["bench", "export-world", "--output", str(data)]) == 0
    assert main(["bench", "dreambooth", "--dataset", str(data), "--subjects", SUBJECT, "--methods", "ether",
                 "--quick", "--metrics", "dino-clip", "--dino_model", str(dino_dir), "--clip_model", str(clip_dir),
                 "--output_dir", str(out), "--quiet"]) == 0  # fmt: skip
    run = out / "runs" / SUBJECT / "ether-x1-seed0"
    scores = json.loads((run / "scores.json").read_text())["metrics"]
    samples = [open_image(p) for p in sorted((run / "samples").iterdir())]  # 00-seed1000, 00-seed1001, 01-...
    texts = [t.format("", "star").replace("  ", " ") for t in WORLD_TEMPLATES[:2] for _ in range(2)]
    assert texts[0] == "a star on a white background"
    clip, dino = ClipEncoder(str(clip_dir)), DinoEncoder(str(dino_dir))
    real = [open_image(p) for p in sorted((data / SUBJECT).iterdir())]
    assert scores["clip_t"] == pytest.approx(float((clip.embed_images(samples) * clip.embed_texts(texts)).sum(-1)
                                                   .mean()), abs=1e-5)  # fmt: skip
    assert scores["dino"] == pytest.approx(float((dino.embed(samples) @ dino.embed(real).T).mean()), abs=1e-5)
    with_identifier = [t.format("sks", "star") for t in WORLD_TEMPLATES[:2] for _ in range(2)]
    assert scores["clip_t"] != pytest.approx(
        float((clip.embed_images(samples) * clip.embed_texts(with_identifier)).sum(-1).mean()), abs=1e-5)  # fmt: skip
    table = (out / "dreambooth.md").read_text()
    assert "| DINO ↑ | CLIP-I ↑ | CLIP-T ↑ |" in table


def test_ctrl_c_stops_the_command_in_one_line_and_frees_the_run(tmp_path):
    """The command as a user runs it, interrupted (SIGINT) while it trains a run: one line, exit 130, the run's claim
    released (a rerun, in this process or another, takes the run up at once)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    data, out = tmp_path / "tiny-dreambooth", tmp_path / "bench"
    assert main(["bench", "export-world", "--output", str(data)]) == 0
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "ether_diffusion.cli", "bench", "dreambooth", "--dataset", str(data),
               "--subjects", SUBJECT, "--methods", "ether", "--num_class_images", "2", "--inference_steps", "2",
               "--images_per_prompt", "1", "--num_prompts", "1", "--max_train_steps", "5000", "--output_dir", str(out),
               "--quiet"]  # fmt: skip
    # SIGINT as a terminal delivers it, also where this test itself runs in the background (a shell starts background
    # jobs with SIGINT ignored, and a Python started so never turns it into KeyboardInterrupt)
    process = subprocess.Popen(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        claim = out / "runs" / SUBJECT / "ether-x1-seed0" / "claim.json"
        deadline = time.time() + 240
        while not claim.is_file() and process.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert claim.is_file(), process.communicate()[1][-2000:]
        time.sleep(2)  # inside the run: class images, the task, the loop
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()  # never left training 5000 steps after a failure
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("stopped; rerun the same command to resume")
    assert not claim.exists()


@pytest.mark.parametrize("task", ["dreambooth", "control"])
def test_pack_bench_measures_adapters_per_hour(tmp_path, capsys, task):
    """`bench pack`: every K of every round trains its jobs packed and is timed; the table and the JSON say it."""
    out = tmp_path / "pack.json"
    extra = ["--no_prior", "--resolution", "32"] if task == "dreambooth" else []
    assert main(["bench", "pack", "--task", task, "--packs", "1", "2", "--rounds", "1", "--steps", "2", *extra,
                 "--json", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["task"] == task and set(report["packs"]) == {"K=1", "K=2"}
    for row in report["packs"].values():
        assert row["adapters_per_hour"] > 0 and row["peak_mb"] > 0 and len(row["step_seconds"]) == 1
    table = capsys.readouterr().out
    assert "| 2 |" in table and ("control runs (batch 8)" in table) == (task == "control")
