"""A benchmark's output folder under bad input: records of the wrong shape count as unfinished (the run is scored
again and the log says so), processes sharing a folder claim their runs, and Ctrl-C ends the command in one line.
Fast: a benchmark whose training is an adapter file already there and whose scoring is a constant (no model)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ether_diffusion.bench.claims import CLAIM, RunClaim
from ether_diffusion.bench.config import DREAMBOOTH_METHODS
from ether_diffusion.bench.metrics import Metric
from ether_diffusion.bench.report import summarise
from ether_diffusion.bench.runner import BenchRunner
from ether_diffusion.bench.runs import BENCH_RECORD, SCORES, TRAINED, BenchMismatchError, RunStore
from ether_diffusion.cli import main
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


# --- claims ---------------------------------------------------------------------------------------------------


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now
    return child.pid


def write_claim(run_dir: Path, pid: int, host: str, age: float = 0.0) -> Path:
    path = run_dir / CLAIM
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host, "token": "theirs", "since": time.time() - age}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_one_process_holds_a_run_and_a_second_claim_is_refused_until_it_is_released(tmp_path):
    first, second = RunClaim(tmp_path / "run"), RunClaim(tmp_path / "run")
    assert first.acquire() and first.held
    claim = json.loads((tmp_path / "run" / CLAIM).read_text())
    assert (claim["pid"], claim["host"]) == (os.getpid(), socket.gethostname())
    assert not second.acquire() and second.holder["pid"] == os.getpid()  # alive: this very process
    assert "process" in RunClaim.describe(second.holder)
    first.release()
    assert not (tmp_path / "run" / CLAIM).exists()
    with second:
        assert second.held and not first.acquire()
    assert first.acquire()
    first.release()


def test_a_claim_of_a_dead_process_or_a_stale_one_is_taken_over(tmp_path):
    host = socket.gethostname()
    write_claim(tmp_path / "dead", dead_pid(), host)  # killed: the pid is gone on this host
    write_claim(tmp_path / "stale", os.getpid(), "another-host", age=3600)  # not touched for an hour
    write_claim(tmp_path / "away", os.getpid(), "another-host", age=5)  # another host, beating: alive
    for name in ("dead", "stale"):
        claim = RunClaim(tmp_path / name)
        assert claim.acquire(), name
        assert json.loads((tmp_path / name / CLAIM).read_text())["pid"] == os.getpid()
        claim.release()
    away = RunClaim(tmp_path / "away")
    assert not away.acquire() and away.holder["host"] == "another-host"
    away.release()  # holds nothing: leaves the other host's claim alone
    assert json.loads((tmp_path / "away" / CLAIM).read_text())["token"] == "theirs"


def test_an_unwritten_claim_is_waited_for_then_taken_over(tmp_path):
    path = tmp_path / "run" / CLAIM
    path.parent.mkdir()
    path.write_text("")  # a process between creating the file and writing it ...
    assert not RunClaim(tmp_path / "run").acquire()
    os.utime(path, (time.time() - 60, time.time() - 60))  # ... or one that died there
    claim = RunClaim(tmp_path / "run")
    assert claim.acquire()
    claim.release()


def test_a_held_claim_is_touched_while_held(tmp_path):
    claim = RunClaim(tmp_path / "run", heartbeat=0.05)
    with claim:
        os.utime(claim.path, (time.time() - 3600, time.time() - 3600))
        time.sleep(0.3)
        assert time.time() - claim.path.stat().st_mtime < 60
    assert not claim.path.exists()


@pytest.mark.slow  # a second Python process that imports the package
def test_a_claim_held_by_a_killed_process_is_taken_over(tmp_path):
    """Two real processes: the holder claims the run and is killed; its claim file stays, its pid is gone."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom ether_diffusion.bench.claims import RunClaim\n"
         f"assert RunClaim({str(tmp_path / 'run')!r}).acquire()\nprint('held', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        claim = RunClaim(tmp_path / "run")
        assert not claim.acquire() and claim.holder["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert claim.acquire()  # killed: its claim file stayed, its pid is gone
    claim.release()


def test_a_run_another_live_process_holds_is_skipped_and_said(tmp_path):
    bench = FakeBench(tmp_path)
    run = bench.store.run_dir("dog", RUN)
    (run / TRAINED).write_text(json.dumps({"train_seconds": 3.0, "timed": True}))
    other = RunClaim(run)
    assert other.acquire()
    try:
        summary = bench.execute()
    finally:
        other.release()
    assert bench.scored == ["base"] and [s["method"] for s in summary] == ["base"]
    said = [line for line in bench.lines if "skipped" in line]
    assert len(said) == 1 and f"{RUN}: skipped, process {os.getpid()} on {socket.gethostname()}" in said[0]
    assert "1 run(s) of this grid are not finished yet" in bench.lines[-1]
    assert not (run / CLAIM).exists() and not (run / SCORES).exists()
    again = FakeBench(tmp_path)
    again.execute()  # the holder has gone: the run is this process's now
    assert again.scored == [RUN] and not (run / CLAIM).exists()


def test_a_run_finished_by_its_holder_meanwhile_is_read_back_not_redone(tmp_path, monkeypatch):
    bench, run = finished_bench(tmp_path)
    record = (run / SCORES).read_text()
    again = FakeBench(tmp_path)
    calls = []
    real = again.store.finished

    def finished(run_dir):  # the first look finds nothing: the other process finishes between look and claim
        calls.append(run_dir)
        return None if len(calls) == 2 else real(run_dir)

    monkeypatch.setattr(again.store, "finished", finished)
    again.execute()
    assert again.scored == [] and (run / SCORES).read_text() == record


# --- Ctrl-C ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dreambooth", "control"])
def test_ctrl_c_during_a_benchmark_ends_it_in_one_line(kind, monkeypatch, capsys):
    import importlib

    module = importlib.import_module(f"ether_diffusion.bench.{kind}")

    def interrupted(config, command=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "parse_args", lambda argv, prog=None: argv)
    monkeypatch.setattr(module, "main", interrupted)
    try:
        code = main(["bench", kind, "--output_dir", "somewhere"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C left the command as a traceback")
    err = capsys.readouterr().err
    assert code == 130 and err.count("\n") == 1
    assert err.startswith("stopped; rerun the same command to resume")
