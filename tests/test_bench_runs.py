"""A benchmark's output folder under bad input: records of the wrong shape count as unfinished (the run is scored
again and the log says so). Fast: a benchmark whose training is an adapter file already there and whose scoring is
a constant (no model)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from ether_diffusion.bench.config import DREAMBOOTH_METHODS
from ether_diffusion.bench.metrics import Metric
from ether_diffusion.bench.report import summarise
from ether_diffusion.bench.runner import BenchRunner
from ether_diffusion.bench.runs import BENCH_RECORD, SCORES, TRAINED, BenchMismatchError, RunStore
from ether_diffusion.training.config import TaskKind

RUN = "ether-x1-seed0"
WEIGHTS = "adapter.safetensors"


class FakeBench(BenchRunner):
    """One subject, one ETHER run whose adapter file is already there (nothing trains) and a constant score."""

    kind = TaskKind.DREAMBOOTH
    methods = DREAMBOOTH_METHODS
    record_fields = {"subject": ("text",)}
    base_fields = {"ceiling": ("scores",)}

    def __init__(self, root: Path, report_only: bool = False):
        config = SimpleNamespace(
            output_dir=root, report_only=report_only, defaults=lambda: {}, grid=lambda: [("ether", 1.0, 0)],
            run_name=lambda method, scale, seed: f"{method}-x{scale:g}-seed{seed}",
        )  # fmt: skip
        self.lines: list[str] = []
        super().__init__(config, [], "bench fake", self.lines.append)
        self.open_store({"steps": 2})
        self.scored: list[str] = []
        (self.store.run_dir("dog", RUN) / "train").mkdir(parents=True, exist_ok=True)
        (self.store.run_dir("dog", RUN) / "train" / WEIGHTS).write_bytes(b"trained")

    def groups(self):
        return ["dog"]

    def group_name(self, group):
        return group

    def group_fields(self, group):
        return {"subject": group}

    def base_record(self, group):
        self.scored.append("base")
        return dict(subject=group, method="base", label="base model", lr=None, lr_scale=None, seed=None,
                    parameters=0, diverged=False, metrics={"dino": 0.25}, ceiling={"dino": 0.9})  # fmt: skip

    def run_config(self, group, method, scale, seed, run_dir):
        return SimpleNamespace(learning_rate=6e-3 * scale, resume_from_checkpoint=None)

    def task(self, method, run_config):
        return SimpleNamespace(weight_name=WEIGHTS)

    def evaluate(self, group, method, run_config, run_dir, adapter, snapshots):
        self.scored.append(run_dir.name)
        return dict(parameters=7, images=2, metrics={"dino": 0.5})

    def write_report(self):
        return summarise(self.store.collect(), (Metric("dino", "DINO"),), ["base", "ether"], unit="subject")


def finished_bench(tmp_path) -> tuple[FakeBench, Path]:
    bench = FakeBench(tmp_path)
    run = bench.store.run_dir("dog", RUN)
    (run / TRAINED).write_text(json.dumps({"train_seconds": 3.0, "timed": True, "steps": 2, "final_loss": 0.1}))
    summary = bench.execute()
    assert bench.scored == ["base", RUN] and [s["runs"] for s in summary] == [1, 1]
    return bench, run


# valid JSON that is not a run record, and JSON nested deeper than the parser goes
NOT_RECORDS = {
    "a list": ("[]", "it holds a JSON list, not an object"),
    "an empty object": ("{}", "it lacks 'method', 'label', 'metrics'"),
    "null": ("null", "it holds null, not an object"),
    "text metrics": (None, "its 'metrics' is a JSON object, not scores"),
    "a text seed": (None, "its 'seed' is \"0\", not whole number or null"),
    "no subject": (None, "it lacks 'subject'"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "it is not readable JSON (RecursionError"),
}


@pytest.mark.parametrize("case", NOT_RECORDS)
def test_a_scores_file_that_is_not_a_run_record_is_scored_again_and_the_log_says_so(tmp_path, case):
    bench, run = finished_bench(tmp_path)
    good = json.loads((run / SCORES).read_text())
    text, why = NOT_RECORDS[case]
    if text is None:
        bad = {"text metrics": {"metrics": {"dino": "high"}}, "a text seed": {"seed": "0"}}.get(case, {})
        text = json.dumps({k: v for k, v in {**good, **bad}.items() if case != "no subject" or k != "subject"})
    (run / SCORES).write_text(text)
    again = FakeBench(tmp_path)
    summary = again.execute()  # the resumed benchmark: no TypeError, KeyError or RecursionError
    assert again.scored == [RUN]  # scored again; the base run's record is good and kept
    said = [line for line in again.lines if str(run / SCORES) in line]
    assert len(said) == 1 and why in said[0] and "is scored again" in said[0]
    record = json.loads((run / SCORES).read_text())
    assert record["metrics"] == {"dino": 0.5} and record["train_seconds"] == 3.0  # train.json was good
    assert [s["runs"] for s in summary] == [1, 1]


def test_a_bad_record_is_left_out_of_the_table_with_report_only(tmp_path):
    bench, run = finished_bench(tmp_path)
    (run / SCORES).write_text('{"method": "ether"}')
    again = FakeBench(tmp_path, report_only=True)
    summary = again.execute()
    assert again.scored == [] and [s["method"] for s in summary] == ["base"]
    assert any("is not a run record (it lacks 'label'" in line for line in again.lines)
    assert (run / SCORES).read_text() == '{"method": "ether"}'  # --report_only writes no run


@pytest.mark.parametrize(
    "text, why",
    [
        ("[0]", "it holds a JSON list, not an object"),
        ('{"train_seconds": "slow", "timed": true}', "its 'train_seconds' is \"slow\", not number or null"),
        ('{"train_seconds": 1, "timed": true, "method": "lora"}', "it holds fields no such record has ('method')"),
        ("{", "it is not readable JSON"),
    ],
)
def test_a_training_record_of_the_wrong_shape_is_scored_without_its_time(tmp_path, text, why):
    bench, run = finished_bench(tmp_path)
    (run / SCORES).unlink()  # killed after training and before scoring
    (run / TRAINED).write_text(text)
    again = FakeBench(tmp_path)
    again.execute()
    assert again.scored == [RUN]
    said = [line for line in again.lines if str(run / TRAINED) in line]
    assert len(said) == 1 and why in said[0] and "scored without its training time" in said[0]
    record = json.loads((run / SCORES).read_text())
    assert (record["method"], record["train_seconds"], record["timed"]) == ("ether", None, False)


@pytest.mark.parametrize("text", ["[]", "{}", '{"kind": "dreambooth", "identity": []}', "[" * 100_000])
def test_a_bench_record_of_the_wrong_shape_refuses_the_folder_in_one_line(tmp_path, text):
    (tmp_path / BENCH_RECORD).write_text(text)
    with pytest.raises(BenchMismatchError, match="is not a benchmark's record .*use another --output_dir"):
        RunStore(tmp_path, "dreambooth", {"steps": 2}).open()
    assert (tmp_path / BENCH_RECORD).read_text() == text  # nothing written over
