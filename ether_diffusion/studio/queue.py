"""The studio's queue: DreamBooth jobs added one by one, then trained side by side in one packed run.

A queued job is a folder ``<workspace>/queue/<job id>/`` like a single job's (``state.json``; ``instance/``, its
uploaded images; ``output/``, what its run writes). **Train queue** trains every queued job in one packed run
(``training/pack.py``: ``pack`` jobs per training step, each with its own data, seed, rate and length; jobs of
another adapter layout in packs of their own); ``<workspace>/queue/runs/<run id>/`` holds the run's job list and its
pack checkpoints. Each job's row shows its own progress; a finished job's adapter goes to the adapter store under
its name (the next free one if the name was taken meanwhile), with its final samples as thumbnail.

    queued ─► preparing ─► training ─► saving ─► done
                              │    └─► failed (its loss diverged: the others go on)
       Stop queue ─► stopped ─┴─► Train queue ─► resumed where it stood, bit for bit
       (studio restarted during a run) ─► interrupted ─► Train queue ─► resumed from the run's last checkpoint

**Stop queue** acts after the current step (or between denoising steps of class images and previews) and
checkpoints every job where it stands. Train queue first resumes an unfinished run (its own jobs only; jobs added
since wait), then starts a new run for whatever is queued, until nothing is. Removing a job that belongs to an
unfinished run ends that run: its other unfinished jobs go back to the queue and start again from step 0.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from ..config import METHOD_LABELS
from ..files import atomic_write
from ..jobs import job_for
from ..training.config import ConfigError, TaskKind
from ..training.pack import DEFAULT_PACK, PackedTrainer
from .jobs import STATE_FILE, JobManager, TrainSpec, new_job_id, read_states
from .workspace import StudioError, inside

__all__ = ["QUEUE_HEADERS", "QUEUE_PHASES", "JobQueue"]

QUEUE_PHASES = ("queued", "preparing", "training", "saving", "done", "stopped", "failed", "interrupted")
ACTIVE = ("preparing", "training", "saving")
OPEN = ("queued", "stopped", "interrupted", *ACTIVE)  # not finished: its adapter name is spoken for
QUEUE_HEADERS = ["adapter", "method", "phase", "step", "loss", "ETA", "job"]
RUN_FILE, RUN_FINISHED = "run.json", "finished"


def unfinished(state: dict) -> bool:
    """The job still has to train: waiting, under way, stopped, or in a run that failed (not one it diverged in)."""
    return state["phase"] in OPEN or (state["phase"] == "failed" and not state.get("diverged"))


class JobQueue:
    """Queued DreamBooth jobs of one workspace and the packed runs that train them; ``rows()`` is what the page
    polls. One training at a time in a studio: a queue run and a single job (``JobManager``) refuse each other."""

    def __init__(self, manager: JobManager, pack: int = DEFAULT_PACK):
        self.manager, self.pack = manager, int(pack)
        self.folder = manager.workspace.root / "queue"
        self.runs = self.folder / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # guards the states
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._jobs: dict[str, dict] = {}  # job id -> state, oldest first
        self.skipped: list[str] = []  # job folders whose state.json could not be read, with why
        manager.queue = self
        self._load()

    # --- state -------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        found, self.skipped = read_states(self.folder, QUEUE_PHASES)
        for state in sorted(found, key=lambda s: s.get("created", 0)):
            self._jobs[state["id"]] = state
            if state["phase"] in ACTIVE:  # the studio stopped during the run
                self._set(state["id"], force=True, phase="interrupted", eta_seconds=None,
                          message="the studio stopped while this job trained; Train queue resumes it")  # fmt: skip

    def _set(self, job_id: str, force: bool = True, **changes) -> None:
        """Change a job's state and write it (at once for phases, at most once a second for steps)."""
        with self._lock:
            state = self._jobs[job_id]
            new_phase = changes.get("phase", state.get("phase")) != state.get("phase")
            state.update(changes, updated=time.time())
            now = time.monotonic()
            if not (force or new_phase or now - state.get("_written", 0.0) > 1.0):
                return
            state["_written"] = now
            record = {k: v for k, v in state.items() if not k.startswith("_")}
        with atomic_write(inside(self.folder, job_id) / STATE_FILE) as tmp:
            tmp.write_text(json.dumps(record, indent=1))

    def jobs(self) -> list[dict]:
        """Copies of every job's state, oldest first."""
        with self._lock:
            return [{k: v for k, v in s.items() if not k.startswith("_")} for s in self._jobs.values()]

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def rows(self) -> list[list]:
        """The page's table: one row per job (``QUEUE_HEADERS``)."""
        rows = []
        for s in self.jobs():
            spec = s["spec"]
            eta = s.get("eta_seconds")
            rows.append([
                spec["adapter_name"], METHOD_LABELS[spec["method"]], s["phase"], f"{s.get('step', 0)} / {s['total']}",
                "" if s.get("loss") is None else f"{s['loss']:.4f}",
                f"{int(eta) // 60}:{int(eta) % 60:02d}" if eta is not None and s["phase"] == "training" else "",
                s["id"],
            ])  # fmt: skip
        return rows

    def summary(self) -> str:
        """One line: how many jobs in each phase, and what Train queue would do."""
        jobs = self.jobs()
        if not jobs:
            return "The queue is empty: set a job up on the left, then **Add to queue**."
        counts: dict[str, int] = {}
        for s in jobs:
            counts[s["phase"]] = counts.get(s["phase"], 0) + 1
        line = " · ".join(f"{n} {phase}" for phase, n in counts.items())
        if self.running():
            return f"**training** up to {self.pack} jobs per step · {line}"
        waiting = sum(1 for s in jobs if unfinished(s))  # not running: none is under way
        return line + (f" · **Train queue** trains {waiting} side by side" if waiting else "")

    def removable(self) -> list[str]:
        """Job ids the page may offer to remove (not in a running run)."""
        running = self.running()
        return [s["id"] for s in self.jobs() if not (running and s.get("run") and unfinished(s))]

    # --- actions -----------------------------------------------------------------------------------------------
    def add(self, spec) -> dict:
        """Check ``spec`` as Start would (and that it packs) and queue it; StudioError says what is wrong."""
        if getattr(spec, "kind", None) is not TaskKind.DREAMBOOTH:
            raise StudioError("control jobs do not queue: they train one at a time with Start (the queue trains "
                              "DreamBooth jobs side by side)")  # fmt: skip
        spec = spec.validated()
        name = spec.adapter_name
        if self.manager.store.exists(name):
            raise StudioError(f"an adapter named {name!r} already exists; choose another name or delete it first")
        if any(s["spec"]["adapter_name"] == name and unfinished(s) for s in self.jobs()):
            raise StudioError(f"a queued job already trains an adapter named {name!r}; choose another name")
        job_id = new_job_id(self.folder, name)
        job_dir = inside(self.folder, job_id)
        job_dir.mkdir()
        try:
            inputs = self.manager._inputs(spec, job_dir)
            config = self._config(spec, inputs["instance_dir"], job_dir)
            _, problems = job_for(job_id, config)  # the run's own checks: settings, packing, the images
            if problems:
                raise StudioError("; ".join(p.split(": ", 1)[-1] for p in problems))
            if self.manager.check_adapter is not None:
                self.manager.check_adapter(config.adapter_config())
        except (StudioError, ConfigError, OSError) as err:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise StudioError(str(err)) from err
        spec.uploads = []  # the page's temporary files: the job has its copies
        state = {"id": job_id, "kind": str(spec.kind), "created": time.time(), "spec": asdict(spec), **inputs,
                 "phase": "queued", "step": 0, "start_step": 0, "total": spec.max_train_steps, "loss": None,
                 "lr": None, "eta_seconds": None, "adapter": None, "error": None, "run": None,
                 "message": "waiting for Train queue"}  # fmt: skip
        with self._lock:
            self._jobs[job_id] = state
        self._set(job_id)
        return dict(state)

    def remove(self, job_id: str) -> str:
        """Take a job off the list (its folder goes; an adapter it published stays in the store). A job of an
        unfinished run ends that run (its other unfinished jobs are queued again, from step 0)."""
        with self.manager._launching:
            with self._lock:
                state = self._jobs.get(job_id)
            if state is None:
                raise StudioError(f"no queued job {job_id!r}; choose one from the list")
            if self.running() and state.get("run") and unfinished(state):
                raise StudioError("this job is in the run that is training: Stop queue first")
            said = f"removed job '{job_id}'"
            run = state.get("run")
            if run and unfinished(state) and not (self.runs / run / RUN_FINISHED).exists():
                again = self._end_run(run, but=job_id)
                if again:
                    said += f"; its run ended, so {', '.join(again)} start again from step 0 at Train queue"
            shutil.rmtree(inside(self.folder, job_id), ignore_errors=True)
            with self._lock:
                del self._jobs[job_id]
            return said

    def start(self) -> str:
        """Train what waits (resuming an unfinished run first) in the background; StudioError if there is nothing
        to train or a training runs."""
        with self.manager._launching:
            if self.running():
                raise StudioError("the queue is already training; Stop queue or wait")
            if self.manager.running():
                raise StudioError(self.manager._busy_message())
            if self._next_run() is None:
                raise StudioError("nothing waits in the queue: add a job first")
            self._stop.clear()
            self._thread = threading.Thread(target=self._work, name="studio-queue", daemon=True)
            self._thread.start()
            return "training the queue"

    def stop(self) -> str:
        if not self.running():
            raise StudioError("the queue is not training")
        self._stop.set()
        return "stopping after the current step; every job keeps its progress"

    def wait(self, timeout: float | None = None) -> list[dict]:
        """Block until the run ends (tests, scripts); returns the jobs."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.jobs()

    # --- runs --------------------------------------------------------------------------------------------------
    def _config(self, spec: TrainSpec, instance_dir: str, job_dir: Path):
        manager = self.manager
        return spec.config(manager.model, Path(instance_dir), job_dir / "output", manager._class_dir(spec), False,
                           manager.model_config, "none")  # fmt: skip

    def _next_run(self) -> tuple[str, list[str], bool] | None:
        """``(run id, its job ids, resume)``: the oldest unfinished run, else a new run of every queued job."""
        for run in sorted({s["run"] for s in self.jobs() if s.get("run") and unfinished(s)}):
            if (self.runs / run / RUN_FINISHED).exists():
                continue
            try:
                ids = json.loads((self.runs / run / RUN_FILE).read_text())["jobs"]
                if not all(job_id in self._jobs for job_id in ids):
                    raise ValueError("a job of it is gone")
            except (OSError, ValueError, KeyError, TypeError):  # its record is unreadable or a job is gone
                self._end_run(run, but=None)
                continue
            return run, ids, True
        jobs = self.jobs()
        waiting = [s["id"] for s in jobs if s["phase"] == "queued" and not s.get("run")]
        if not waiting:
            return None
        return time.strftime("%Y%m%d-%H%M%S-") + f"{len(waiting)}-jobs", waiting, False

    def _end_run(self, run: str, but: str | None) -> list[str]:
        """Give up run ``run``: its unfinished jobs (but ``but``) go back to the queue, from step 0."""
        again = []
        for s in self.jobs():
            if s.get("run") == run and s["id"] != but and unfinished(s):
                shutil.rmtree(inside(self.folder, s["id"]) / "output", ignore_errors=True)
                self._set(s["id"], phase="queued", run=None, step=0, loss=None, lr=None, eta_seconds=None, error=None,
                          message="waiting for Train queue (its run was ended)")  # fmt: skip
                again.append(s["spec"]["adapter_name"])
        shutil.rmtree(self.runs / run, ignore_errors=True)
        return again

    def _work(self) -> None:
        while not self._stop.is_set():
            run = self._next_run()
            if run is None or not self._train(*run):
                return

    def _train(self, run: str, ids: list[str], resume: bool) -> bool:
        """One packed run; True when it finished (the next may start)."""
        folder = self.runs / run
        if not resume:
            folder.mkdir(parents=True, exist_ok=True)
            pack = max(1, min(self.pack, len(ids)))
            with atomic_write(folder / RUN_FILE) as tmp:
                tmp.write_text(json.dumps({"jobs": ids, "pack": pack}))
            for job_id in ids:
                self._set(job_id, run=run, message=f"waiting for a slot (run {run})")
        events = _Events(self)
        try:
            if resume:  # the run's own pack size: its checkpoints' slots
                pack = json.loads((folder / RUN_FILE).read_text())["pack"]
            jobs = []
            for job_id in ids:
                state = self._jobs[job_id]
                config = self._config(TrainSpec(**state["spec"]), state["instance_dir"], inside(self.folder, job_id))
                job, problems = job_for(job_id, config)
                if problems:
                    raise StudioError("; ".join(problems))
                jobs.append(job)
            result = PackedTrainer(jobs, pack, folder / "pack-state", resume=resume, callbacks=[events],
                                   quiet=True).train()  # fmt: skip
        except BaseException as err:  # every failure reaches the page; the thread never dies silently
            for job_id in ids:
                if job_id in self._jobs and unfinished(self._jobs[job_id]):
                    self._set(job_id, phase="failed", error=f"{type(err).__name__}: {err}", eta_seconds=None,
                              traceback=traceback.format_exc()[-4000:],
                              message="the run failed; fix the cause, then Train queue resumes it (or Remove "
                                      "the job)")  # fmt: skip
            return False
        for job_id, why in result.diverged.items():
            if self._jobs[job_id]["phase"] != "failed":
                self._set(job_id, phase="failed", diverged=True, error=why, eta_seconds=None,
                          message="stopped: " + why)  # fmt: skip
        if result.stopped:
            for job_id in ids:
                state = self._jobs[job_id]
                if state["phase"] in ACTIVE:
                    self._set(job_id, phase="stopped", eta_seconds=None,
                              message=f"stopped at step {state['step']}; Train queue resumes it")  # fmt: skip
            return False
        (folder / RUN_FINISHED).write_text(str(result.pack_steps))
        return True

    def _publish(self, job_id: str, result) -> None:
        """The finished job's adapter into the store (its final samples as thumbnail)."""
        state = self._jobs[job_id]
        store, wanted = self.manager.store, state["spec"]["adapter_name"]
        name = wanted if not store.exists(wanted) else store.free_name(wanted)
        samples = Path(result.output_dir) / "samples.png"
        thumbnail = None
        if samples.is_file():
            with Image.open(samples) as image:
                thumbnail = image.convert("RGB")
        store.publish(Path(result.adapter_path), name, thumbnail=thumbnail)
        renamed = "" if name == wanted else f" (as '{name}': '{wanted}' was taken meanwhile)"
        self._set(job_id, phase="done", step=result.global_step, adapter=name, eta_seconds=None,
                  message=f"finished {result.global_step} steps: adapter '{name}' saved{renamed}")  # fmt: skip


class _Events:
    """A packed run's events as its jobs' states."""

    def __init__(self, queue: JobQueue):
        self.queue = queue
        self.ends: list[float] = []  # when each packed step ended: the ETA counts training steps only

    def on_job_start(self, name: str) -> None:
        prior = self.queue._jobs[name]["spec"].get("prior_preservation")
        self.queue._set(name, phase="preparing", message="drawing class images" if prior else "starting")

    def on_job_step(self, name: str, step: int, logs: dict) -> None:
        state = self.queue._jobs[name]
        ends = self.ends[-20:]  # one packed step steps every job once: its recent length is each job's step time
        per_step = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else None
        eta = None if per_step is None else per_step * (state["total"] - step)
        self.queue._set(name, force=False, phase="training", step=step, loss=logs["loss"], lr=logs["lr"],
                        eta_seconds=eta, message="training")  # fmt: skip

    def on_pack_step(self, step: int, slots: dict) -> None:
        self.ends.append(time.monotonic())

    def on_job_end(self, name: str, result) -> None:
        self.queue._set(name, phase="saving", message="publishing the adapter")
        self.queue._publish(name, result)

    def should_stop(self) -> bool:
        return self.queue._stop.is_set()
