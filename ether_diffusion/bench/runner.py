"""What every benchmark does with its grid, written once: the base model once per group, then each (method,
learning-rate scale, seed) run trained on the library's loop (an interrupted one resumed from its checkpoint), its
saved file reloaded into copies of the base pipeline's modules, sampled, scored and recorded; the table after every
run. A rerun of the same command skips what is finished (``runs.py``).

``BenchRunner`` is that skeleton; ``dreambooth.py`` (groups: the dataset's subjects) and ``control.py`` (one group:
the evaluation set) say what a group is and how its images are drawn, scored and tabled:

    groups()                            the table's units (subjects), each with its own base run
    group_name(group) / group_fields(group)   its folder under ``runs/`` and the fields it adds to a record
    base_record(group)                  the base model sampled and scored (a record without timing)
    run_config(group, method, scale, seed, run_dir)   the run's training configuration
    before_training(group, run_config)  what a run needs first (class images, drawn once per class)
    snapshot_paths(run_dir)             adapter files to save during training (``--eval_steps``), or none
    evaluate(group, method, run_config, run_dir, adapter, snapshots)   images and scores of a trained run
    write_report()                      the table, plot and JSON of every finished run
    record_fields / base_fields         what its records add to ``runs.RECORD_FIELDS`` (a file without them is
                                        not a record: the run is scored again)

A process claims a run (``claims.py``) before it does anything to it, so that several processes on one output
folder never train or sample the same run at once: a run another live process holds is skipped, with a line in
the log, and left for that process to finish.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from ..checkpoints import latest_checkpoint
from ..files import write_json
from ..jobs import make_jobs
from ..registry import task_for
from ..training.config import RunConfig, TaskKind
from ..training.pack import PackedTrainer
from .config import Method
from .report import scores_line
from .runs import TRAINED, RunStore, train_run

__all__ = ["BenchRunner"]


class BenchRunner(ABC):
    """One invocation of a benchmark: its configuration, callbacks (given to every run's trainer), log and store."""

    kind: ClassVar[TaskKind]
    #: the methods the grid may name, with their paper learning rates
    methods: ClassVar[dict[str, Method]]
    #: fields every record of this benchmark holds beyond ``runs.RECORD_FIELDS``, and those its base records add
    record_fields: ClassVar[dict[str, tuple[str, ...]]] = {}
    base_fields: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init__(self, config, callbacks, command: str | None, log):
        self.config, self.callbacks, self.log = config, list(callbacks), log
        self.command = command or f"ether-diffusion bench {self.kind} (called from Python)"

    def open_store(self, settings: dict) -> None:
        """The output folder, checked to hold a benchmark of these ``settings`` (or made)."""
        self.store = RunStore(self.config.output_dir, str(self.kind), settings, self.command, self.config.defaults(),
                              self.record_fields, self.base_fields, self.log)  # fmt: skip
        self.store.open()

    def task(self, method: str, run_config: RunConfig):
        """A new task of a run: ``method``'s adapters (ETHER, a PEFT peer) on the backend of the model's family."""
        return task_for(run_config, self.methods[method].make_adapters(run_config))

    # --- what each benchmark says ---------------------------------------------------------------------------------
    @abstractmethod
    def groups(self) -> list: ...

    @abstractmethod
    def group_name(self, group) -> str: ...

    def group_fields(self, group) -> dict:
        return {}

    def log_prefix(self, group) -> str:
        return ""

    @abstractmethod
    def base_record(self, group) -> dict: ...

    @abstractmethod
    def run_config(self, group, method: str, scale: float, seed: int, run_dir: Path) -> RunConfig: ...

    def before_training(self, group, run_config: RunConfig) -> None:
        return None

    def snapshot_paths(self, run_dir: Path, weight_name: str) -> dict[int, Path]:
        return {}

    @abstractmethod
    def evaluate(self, group, method: str, run_config: RunConfig, run_dir: Path, adapter: Path,
                 snapshots: dict[int, Path]) -> dict: ...  # fmt: skip

    @abstractmethod
    def write_report(self) -> dict: ...

    # --- the grid -----------------------------------------------------------------------------------------------
    def execute(self) -> dict:
        missing = 0
        for group in self.groups():
            self.base_run(group)
            if getattr(self.config, "pack", 1) > 1 and not self.config.report_only:
                self.train_packed(group)
            for method, scale, seed in self.config.grid():
                if self.run(group, method, scale, seed) is None:
                    missing += 1
                    continue
                self.write_report()
        if missing:
            self.log(f"{missing} run(s) of this grid are not finished yet; the table holds the finished ones")
        return self.write_report()

    def base_run(self, group) -> dict | None:
        run_dir = self.store.run_dir(self.group_name(group), "base")
        done = self.store.finished(run_dir)
        if done is not None or self.config.report_only:
            return done
        with self.store.claim(run_dir) as claim:
            if not claim.held:
                return self.skip(group, "base model", claim)
            done = self.store.finished(run_dir)  # finished by the process that held it a moment ago
            if done is not None:
                return done
            start = time.time()
            record = self.base_record(group)
            record["sample_seconds"] = time.time() - start
            self.log(f"{self.log_prefix(group)}{record['label']}: {scores_line(record['metrics'])}")
            return self.store.finish(run_dir, record)

    def train_packed(self, group) -> None:
        """``--pack K``: the group's ETHER runs that are not trained yet (and not resumed from a solo checkpoint)
        trained K per step (``training/pack.py``), each into its own ``train/`` folder with its training record and
        its ``--eval_steps`` snapshots; evaluating them is left to the grid's loop, which finds them trained. PEFT
        peers, runs another process holds and the others train one at a time there."""
        config = self.config
        named, folders, snapshots = [], {}, {}
        with contextlib.ExitStack() as claims:
            for method, scale, seed in config.grid():
                if self.methods[method].peer or not self.methods[method].adapters:
                    continue
                name = config.run_name(method, scale, seed)
                run_dir = self.store.run_dir(self.group_name(group), name)
                run_config = self.run_config(group, method, scale, seed, run_dir)
                train = run_dir / "train"
                weight_name = self.task(method, run_config).weight_name
                if (
                    self.store.finished(run_dir) is not None
                    or (train / weight_name).is_file()
                    or latest_checkpoint(train)
                ):
                    continue
                if not claims.enter_context(self.store.claim(run_dir)).held:
                    continue
                self.before_training(group, run_config)
                named.append((name, run_config))
                folders[name] = run_dir
                snapshots[name] = self.snapshot_paths(run_dir, weight_name)
            if len(named) < 2:  # nothing to share a step with: the grid's loop trains it alone
                return
            self.log(f"{self.log_prefix(group)}training {len(named)} runs {config.pack} per step")
            jobs = make_jobs(named)
            for job in jobs:  # --eval_steps: the adapter after each of those steps, written as the run passes them
                job.snapshots = snapshots[job.name]
            state = self.store.root / "pack-state" / self.group_name(group)
            result = PackedTrainer(jobs, config.pack, state, resume=True, quiet=True).train()
            for name, trained in result.results.items():
                losses = trained.losses[-50:]
                write_json(folders[name] / TRAINED, dict(
                    train_seconds=trained.train_seconds, timed=True, resumed_from_step=0, steps=trained.global_step,
                    final_loss=statistics.fmean(losses) if losses else None, packed=config.pack,
                ))  # fmt: skip

    def skip(self, group, name: str, claim) -> None:
        """Leave a run another live process holds (``claim.holder``) to that process; returns None (not finished)."""
        self.log(
            f"{self.log_prefix(group)}{name}: skipped, {claim.describe(claim.holder)} is running it "
            f"({claim.path}); rerun later to add it to the table"
        )
        return None

    def run(self, group, method: str, scale: float, seed: int) -> dict | None:
        """One run of the grid: its record, trained and evaluated as needed (None: not finished, ``--report_only``,
        or another process holds it)."""
        config = self.config
        run_dir = self.store.run_dir(self.group_name(group), config.run_name(method, scale, seed))
        done = self.store.finished(run_dir)
        if done is not None or config.report_only:
            return done
        with self.store.claim(run_dir) as claim:
            if not claim.held:
                return self.skip(group, config.run_name(method, scale, seed), claim)
            done = self.store.finished(run_dir)  # finished by the process that held it a moment ago
            if done is not None:
                return done
            return self.run_claimed(group, method, scale, seed, run_dir)

    def run_claimed(self, group, method: str, scale: float, seed: int, run_dir: Path) -> dict:
        """Train (or finish training) and evaluate a run this process holds the claim of; its record."""
        run_config = self.run_config(group, method, scale, seed, run_dir)
        weight_name = self.task(method, run_config).weight_name
        adapter = run_dir / "train" / weight_name
        snapshots = self.snapshot_paths(run_dir, weight_name)
        info = self.store.trained(run_dir) if adapter.is_file() else None
        if info is None and not adapter.is_file():  # not trained yet, or its training was interrupted
            self.before_training(group, run_config)
            if latest_checkpoint(run_dir / "train"):  # continue the interrupted training exactly
                run_config.resume_from_checkpoint = "latest"
            info = train_run(self.task(method, run_config), run_dir, self.callbacks, snapshots)
        info = info or {"train_seconds": None, "timed": False}  # trained, but its record was lost (killed)
        rated = self.methods[method].adapters  # the control encoder alone has no adapter learning rate
        record = dict(
            **self.group_fields(group), method=method, label=self.methods[method].label,
            lr=run_config.learning_rate if rated else None, lr_scale=scale if rated else None, seed=seed,
            parameters=None, metrics={}, **info,
        )  # fmt: skip
        record.setdefault("diverged", False)
        if not record["diverged"]:
            record.update(self.evaluate(group, method, run_config, run_dir, adapter, snapshots))
        self.log(
            f"{self.log_prefix(group)}{record['label']:<20} "
            + ("" if record["lr"] is None else f"lr {record['lr']:.0e} ")
            + f"seed {seed}: "
            + ("diverged" if record["diverged"] else scores_line(record["metrics"]))
            + ("" if record.get("train_seconds") is None else f" ({record['train_seconds']:.0f} s training)")
        )
        return self.store.finish(run_dir, record)
