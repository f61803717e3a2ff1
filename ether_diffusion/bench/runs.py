"""A benchmark's output folder: one folder per run, a run is finished when its ``scores.json`` exists, and a rerun of
the same command continues where the last one stopped.

    <output_dir>/
      bench.json                        the settings every run shares (a rerun with other settings is refused)
      class_images/<class>/             prior-preservation images, drawn once per class, shared by subjects and methods
      runs/<subject>/base/              the base model: samples/, scores.json
      runs/<subject>/<method>-x<lr scale>-seed<seed>/
        train/                          the trainer's folder: checkpoints while it runs, then the adapter file
        samples/                        K images per prompt, fixed seeds (written one by one)
        snapshots/step-<N>/             with --eval_steps: the adapter as it was after step N of this training
                                        (adapter.safetensors, written during training) and its samples/
        scores.json                     written last, atomically: the run is done

Resuming is per piece: a finished run is read back, a trained run is sampled (only the missing images) and
scored, an unfinished training continues from its last checkpoint (the trainer's exact resume).
"""

from __future__ import annotations

import gc
import json
import shutil
import statistics
from pathlib import Path

import torch

from ..files import read_json, write_json
from ..training.callbacks import Callback
from ..training.config import RunConfig
from ..training.trainer import Trainer, TrainingDivergedError
from .report import machine

__all__ = [
    "BENCH_RECORD",
    "SCORES",
    "AdapterSnapshots",
    "BenchInterrupted",
    "BenchMismatchError",
    "RunStore",
    "SnapshotMissing",
    "missing_snapshots",
    "train_run",
]

BENCH_RECORD = "bench.json"
SCORES = "scores.json"


class BenchMismatchError(ValueError):
    """The output folder holds a benchmark with other settings; resuming it would mix incomparable runs."""


class BenchInterrupted(RuntimeError):
    """A run was stopped before it finished (a callback asked); rerunning the same command resumes it."""


def _plain(value):
    return json.loads(json.dumps(value, default=str))


class RunStore:
    def __init__(self, root: str | Path, kind: str, identity: dict, command: str | None = None,
                 defaults: dict | None = None):  # fmt: skip
        self.root, self.kind, self.identity, self.command = Path(root), kind, _plain(identity), command
        # settings added to the library after a folder was made: its runs had their defaults
        self.defaults = _plain({k: v for k, v in (defaults or {}).items() if k in self.identity})

    def open(self) -> RunStore:
        """Create the folder, or check that it holds a benchmark of these settings (``BenchMismatchError``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        record_file = self.root / BENCH_RECORD
        if record_file.is_file():
            try:
                record = json.loads(record_file.read_text())
                kind, identity = record["kind"], {**self.defaults, **RunConfig.comparable(record["identity"])}
            except (ValueError, KeyError, TypeError) as err:
                raise BenchMismatchError(f"'{record_file}' is unreadable ({err}); use another --output_dir") from err
            if kind != self.kind:
                raise BenchMismatchError(
                    f"'{self.root}' holds a {kind} benchmark, not a {self.kind} one: use another --output_dir"
                )
            differ = sorted(k for k in set(identity) | set(self.identity) if identity.get(k) != self.identity.get(k))
            if differ:
                shown = "; ".join(f"{k}: {identity.get(k)!r} there, {self.identity.get(k)!r} now" for k in differ[:6])
                raise BenchMismatchError(
                    f"'{self.root}' holds a benchmark with other settings ({shown}). Its runs would not be comparable "
                    "with these: rerun with its settings to resume it, or choose another --output_dir"
                )
        else:
            write_json(record_file, {"kind": self.kind, "identity": self.identity})
        return self

    def run_dir(self, group: str, name: str) -> Path:
        """The folder of a run (made when the run first writes into it)."""
        return self.root / "runs" / group / name

    @staticmethod
    def snapshot_dir(run_dir: Path, step: int) -> Path:
        """The folder of a run's adapter as it was after ``step`` (its file, then its samples)."""
        return run_dir / "snapshots" / f"step-{step}"

    def class_dir(self, class_noun: str) -> Path:
        slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in class_noun.strip()) or "class"
        return self.root / "class_images" / slug

    @staticmethod
    def finished(run_dir: Path) -> dict | None:
        """The run's scores if it is finished, else None (a damaged scores.json counts as unfinished)."""
        return read_json(run_dir / SCORES)

    def collect(self) -> list[dict]:
        """Every finished run in the folder (this invocation's and earlier ones': the settings are the same), each
        with ``run``, its folder relative to ``runs/``."""
        records = []
        for path in sorted((self.root / "runs").glob(f"*/*/{SCORES}")):
            record = read_json(path)
            if record is not None:
                records.append({**record, "run": str(path.parent.relative_to(self.root / "runs"))})
        return records

    def finish(self, run_dir: Path, record: dict) -> dict:
        """Mark the run finished with its scores (and the machine and command that made it), then drop its training
        checkpoints (the adapter file stays)."""
        record = {**record, "machine": record.get("machine") or machine(), "command": self.command}
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / SCORES, record)
        for checkpoint in (run_dir / "train").glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)
        return record


def missing_snapshots(paths: dict[int, Path], up_to_step: int) -> list[int]:
    """The steps ≤ ``up_to_step`` of ``paths`` whose file is absent (a run past them cannot write them any more)."""
    return sorted(step for step, path in paths.items() if step <= up_to_step and not Path(path).is_file())


class SnapshotMissing(RuntimeError):
    """A resumed run is past a snapshot step whose file is gone."""


class AdapterSnapshots(Callback):
    """Writes the task's artifact (``task.save``: one adapter file, atomically) at the end of each step in ``paths``
    (``{step: file}``), on the main process: the adapter as it was at that step of this run (points along one run:
    the trade-off curves of ``--eval_steps``), without training anything more.

    A resumed run writes the snapshots of the steps it trains again (a snapshot after the checkpoint it resumes from
    is rewritten with the same tensors); those before that checkpoint must already exist, else ``SnapshotMissing``
    is raised before the first step. A snapshot of non-finite tensors is not written: the run is stopped with the
    loop's ``TrainingDivergedError``, as a checkpoint would stop it.
    """

    def __init__(self, task, paths: dict[int, Path]):
        self.task = task
        self.paths = {int(step): Path(path) for step, path in paths.items()}
        self.written: list[int] = []

    def on_train_start(self, total_steps, start_step):
        missing = missing_snapshots(self.paths, start_step)
        if missing:
            raise SnapshotMissing(
                f"the run resumes from step {start_step}, past the adapter snapshot(s) of step(s) {missing}, whose "
                f"file(s) are gone ({self.paths[missing[0]]}); they cannot be made without training again: delete "
                f"the run's training folder ({self.task.config.output_dir}) to retrain it from step 0"
            )
        late = [step for step in self.paths if step >= total_steps]
        if late:
            raise ValueError(f"snapshot steps {sorted(late)} are not before the run's last step ({total_steps})")

    def on_step(self, step, logs):
        path = self.paths.get(step)
        if path is None or not _is_main_process():
            return
        params = [p for group in self.task.parameter_groups() for p in group["params"]]
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise TrainingDivergedError(
                f"the trained vectors hold NaN or infinite values at step {step}, before the snapshot {path}; "
                "nothing was saved from this state"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        self.task.save(path, {"steps": str(step), "snapshot": "true"})
        self.written.append(step)

    def on_train_end(self, result):
        self.task = None  # the task holds the models: do not keep them alive past the run


def _is_main_process() -> bool:
    """Whether this is the process that writes files (accelerate's main process; the only one without a launcher)."""
    from accelerate import PartialState

    return PartialState().is_main_process


class _RunWatch(Callback):
    """Remembers where a run started (0, or the step of the checkpoint it resumed from)."""

    start_step = 0

    def on_train_start(self, total_steps, start_step):
        self.start_step = start_step


def train_run(task, run_dir: Path, callbacks=(), snapshots: dict[int, Path] | None = None) -> dict:
    """Train (or finish training) one run on the library's loop; returns what its record needs: train seconds
    (``timed`` only when the run went from step 0 in this process), steps, final loss, or ``diverged``.

    ``snapshots``: ``{step: file}``, the adapter saved as it is after each of those steps (``AdapterSnapshots``), so
    that points along the run are evaluated without training more. A run stopped by a callback keeps its
    checkpoint, loses the file the loop saves on stopping (so that it is not taken for a finished run) and raises
    ``BenchInterrupted``."""
    watch = _RunWatch()
    saver = AdapterSnapshots(task, snapshots) if snapshots else None
    try:
        result = Trainer(task, [watch, saver, *callbacks]).train()
    except TrainingDivergedError as err:
        return {"diverged": True, "error": str(err)}
    finally:
        del task, saver  # the task holds the run's models
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if result.stopped_early:
        if result.adapter_path is not None:
            Path(result.adapter_path).unlink(missing_ok=True)
        raise BenchInterrupted(
            f"stopped at step {result.global_step} of {run_dir}; rerun the same command to resume from there"
        )
    info = dict(
        train_seconds=result.train_seconds,
        timed=watch.start_step == 0,
        resumed_from_step=watch.start_step,
        steps=result.global_step,
        final_loss=statistics.fmean(result.losses[-50:]) if result.losses else None,
    )
    write_json(run_dir / "train.json", info)
    return info
