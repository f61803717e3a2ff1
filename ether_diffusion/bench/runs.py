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
        train.json                      the training's record (seconds, steps, final loss), once it has finished
        scores.json                     written last, atomically: the run is done
        claim.json                      while a process runs the run (``claims.py``): others leave it alone

Resuming is per piece: a finished run is read back, a trained run is sampled (only the missing images) and
scored, an unfinished training continues from its last checkpoint (the trainer's exact resume). A ``scores.json``
or ``train.json`` that is not a record of the shape below (damaged, ``[]``, ``{}``, a field of the wrong type: a
file edited or cut short) counts as absent: the log says so, and the run is scored again from its adapter and
samples (its training time then stays unknown where ``train.json`` was the bad one).
"""

from __future__ import annotations

import gc
import json
import shutil
import statistics
from pathlib import Path

import torch

from ..files import write_json
from ..training.callbacks import Callback
from ..training.config import RunConfig
from ..training.trainer import Trainer, TrainingDivergedError
from .claims import RunClaim
from .report import machine

__all__ = [
    "BENCH_RECORD",
    "RECORD_FIELDS",
    "SCORES",
    "TRAINED",
    "AdapterSnapshots",
    "BenchInterrupted",
    "BenchMismatchError",
    "RunStore",
    "SnapshotMissing",
    "missing_snapshots",
    "record_problem",
    "train_run",
]

BENCH_RECORD = "bench.json"
SCORES = "scores.json"
TRAINED = "train.json"


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scores(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and (v is None or _number(v)) for k, v in value.items())


#: the types a record's field may hold, by name (the name is what a refusal says)
KINDS = {
    "text": lambda v: isinstance(v, str),
    "whole number": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": _number,
    "true/false": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    "scores": _scores,  # {metric: number or null}
    "curve": lambda v: (
        isinstance(v, list)
        and all(isinstance(p, dict) and KINDS["whole number"](p.get("step")) and _scores(p.get("metrics")) for p in v)
    ),  # [{"step", "metrics", ...}, ...]
}
#: what every run record holds (``scores.json``): field -> the kinds its value may be
RECORD_FIELDS = {"method": ("text",), "label": ("text",), "metrics": ("scores",), "diverged": ("true/false",),
                 "lr": ("number", "null"), "lr_scale": ("number", "null"), "seed": ("whole number", "null"),
                 "parameters": ("whole number", "null")}  # fmt: skip
#: fields a run record may hold, checked when present
OPTIONAL_FIELDS = {"train_seconds": ("number", "null"), "timed": ("true/false",), "images": ("whole number",),
                   "sample_seconds": ("number", "null"), "curve": ("curve",), "command": ("text", "null"),
                   "machine": ("text", "null"), "steps": ("whole number",), "resumed_from_step": ("whole number",),
                   "final_loss": ("number", "null"), "error": ("text",), "packed": ("whole number",)}  # fmt: skip
#: what a training's record holds (``train.json``), and nothing else: its fields go into the run record
TRAIN_FIELDS = {"train_seconds": ("number", "null"), "timed": ("true/false",)}
TRAIN_OPTIONAL = {k: OPTIONAL_FIELDS[k] for k in ("resumed_from_step", "steps", "final_loss", "packed")}


def record_problem(record, fields: dict, optional: dict | None = None, only: bool = False) -> str | None:
    """Why ``record`` is not a record with ``fields`` (each present, of one of its kinds) and ``optional`` (of their
    kinds where present; with ``only``, no other field), or None if it is one."""
    if not isinstance(record, dict):
        return f"it holds {_shown(record)}, not an object"
    missing = [name for name in fields if name not in record]
    if missing:
        return f"it lacks {', '.join(repr(m) for m in missing)}"
    allowed = {**(optional or {}), **fields}
    if only:
        unknown = sorted(set(record) - set(allowed))
        if unknown:
            return f"it holds fields no such record has ({', '.join(repr(u) for u in unknown)})"
    for name, kinds in allowed.items():
        if name in record and not any(KINDS[kind](record[name]) for kind in kinds):
            return f"its {name!r} is {_shown(record[name])}, not {' or '.join(kinds)}"
    return None


def _shown(value) -> str:
    """A JSON value in a few words: its type if it is a container, else itself (cut short)."""
    if isinstance(value, dict | list):
        return f"a JSON {'object' if isinstance(value, dict) else 'list'}"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_record(path: Path) -> tuple[object, str | None]:
    """``(the JSON at path, None)``, or ``(None, why it is unreadable)`` (a file that is absent too)."""
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: nested deeper than the parser goes
        return None, f"it is not readable JSON ({type(err).__name__}: {str(err)[:80]})"


class BenchMismatchError(ValueError):
    """The output folder holds a benchmark with other settings; resuming it would mix incomparable runs."""


class BenchInterrupted(RuntimeError):
    """A run was stopped before it finished (a callback asked); rerunning the same command resumes it."""


def _plain(value):
    return json.loads(json.dumps(value, default=str))


class RunStore:
    """A benchmark's output folder. ``fields``: what the benchmark's records hold beyond ``RECORD_FIELDS`` (field ->
    kinds), ``base_fields`` what its base model's records add; a record without them is not a run record. ``log``
    hears once about each record in the folder that is not one."""

    def __init__(self, root: str | Path, kind: str, identity: dict, command: str | None = None,
                 defaults: dict | None = None, fields: dict | None = None, base_fields: dict | None = None,
                 log=None):  # fmt: skip
        self.root, self.kind, self.identity, self.command = Path(root), kind, _plain(identity), command
        # settings added to the library after a folder was made: its runs had their defaults
        self.defaults = _plain({k: v for k, v in (defaults or {}).items() if k in self.identity})
        self.fields = {**RECORD_FIELDS, **(fields or {})}
        self.base_fields = {**self.fields, **(base_fields or {})}
        self.log = log or (lambda message: None)
        self._told: set[Path] = set()

    def open(self) -> RunStore:
        """Create the folder, or check that it holds a benchmark of these settings (``BenchMismatchError``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        record_file = self.root / BENCH_RECORD
        if record_file.is_file():
            record, why = read_record(record_file)
            if why is None:
                why = record_problem(record, {"kind": ("text",), "identity": ("object",)})
            if why is not None:
                raise BenchMismatchError(
                    f"'{record_file}' is not a benchmark's record ({why}), so the settings of the runs in "
                    f"'{self.root}' are unknown: use another --output_dir"
                )
            kind, identity = record["kind"], {**self.defaults, **RunConfig.comparable(record["identity"])}
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

    def _tell(self, path: Path, message: str) -> None:
        """``message`` about the file at ``path`` into the log, once per file."""
        if path not in self._told:
            self._told.add(path)
            self.log(f"'{path}' {message}")

    def finished(self, run_dir: Path) -> dict | None:
        """The run's scores if it is finished, else None. A ``scores.json`` that is not a run record (damaged, or
        valid JSON of another shape) counts as unfinished, and the log says so: the run is scored again."""
        path = run_dir / SCORES
        if not path.exists():
            return None
        record, why = read_record(path)
        if why is None:
            base = isinstance(record, dict) and record.get("method") == "base"
            why = record_problem(record, self.base_fields if base else self.fields, OPTIONAL_FIELDS)
        if why is not None:
            self._tell(
                path,
                f"is not a run record ({why}): the run counts as unfinished and is scored again "
                "(not with --report_only)",
            )
            return None
        return record

    def trained(self, run_dir: Path) -> dict | None:
        """The run's training record (``train.json``), or None if it is absent or not one (the log says which)."""
        path = run_dir / TRAINED
        if not path.exists():
            return None
        record, why = read_record(path)
        if why is None:
            why = record_problem(record, TRAIN_FIELDS, TRAIN_OPTIONAL, only=True)
        if why is not None:
            self._tell(path, f"is not a training record ({why}): the run is scored without its training time")
            return None
        return record

    def collect(self) -> list[dict]:
        """Every finished run in the folder (this invocation's and earlier ones': the settings are the same), each
        with ``run``, its folder relative to ``runs/``; a ``scores.json`` that is not a run record is left out."""
        records = []
        for path in sorted((self.root / "runs").glob(f"*/*/{SCORES}")):
            record = self.finished(path.parent)
            if record is not None:
                records.append({**record, "run": str(path.parent.relative_to(self.root / "runs"))})
        return records

    def claim(self, run_dir: Path) -> RunClaim:
        """This process's claim of a run (``claims.py``): use it as ``with store.claim(run_dir) as claim:``."""
        return RunClaim(run_dir)

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
    write_json(run_dir / TRAINED, info)
    return info
