"""Background training for the studio: one job at a time on the library's DreamBooth loop.

A job is a folder ``<workspace>/jobs/<id>/`` holding ``state.json`` (what the page shows), the instance images
when they were uploaded, and ``output/``, the loop's output folder (checkpoints, previews, the adapter). The loop
runs in a thread with ``TrainCallbacks``: each step updates the state (step, loss, lr, ETA), each preview adds to
the gallery, ``stop`` asks the loop to stop after the current step (it saves the adapter and a checkpoint), and
``resume`` runs the loop again with ``--resume_from_checkpoint latest``. Every exception ends the job as
``failed`` with its message on the page; a studio that dies mid-job finds the job ``interrupted`` on restart,
resumable from its last checkpoint.

    preparing ─► training ─► saving ─► done
        │            │ stop ─► stopping ─► stopped ─┐
        └────────────┴──► failed                   ├─► resume ─► preparing …
                 (studio restarted) ─► interrupted ─┘
"""

from __future__ import annotations

import copy
import json
import shutil
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import atomic_write
from ..training.checkpoints import checkpoint_step, latest_checkpoint
from ..training.dreambooth import PAPER_LEARNING_RATE
from .adapters import AdapterStore
from .uploads import save_uploads
from .workspace import StudioError, Workspace, check_name, inside

__all__ = ["ACTIVE_PHASES", "JobManager", "TrainSpec", "shipped_subjects"]

ACTIVE_PHASES = ("preparing", "training", "stopping", "saving")
METHODS = {"ETHER": "ether", "ETHER+": "ether_plus", "ether": "ether", "ether_plus": "ether_plus"}
STATE_FILE = "state.json"


def shipped_subjects() -> dict[str, dict]:
    """``{name: subject.json record + "folder"}`` for the subjects shipped in ``assets/subjects``."""
    from ..world.assets import default_subjects_path

    found = {}
    root = default_subjects_path()
    for meta in sorted(root.glob("*/subject.json")) if root.is_dir() else []:
        record = json.loads(meta.read_text())
        record["folder"] = str(meta.parent)
        found[meta.parent.name] = record
    return found


@dataclass
class TrainSpec:
    """What the Train tab asks for. ``subject`` (a shipped one) or ``uploads`` (3-10 image files)."""

    adapter_name: str
    instance_prompt: str
    subject: str | None = None
    uploads: list[str] = field(default_factory=list)
    class_prompt: str = ""
    method: str = "ether_plus"
    n_blocks: int = 1
    max_train_steps: int = 400
    learning_rate: float = PAPER_LEARNING_RATE
    prior_preservation: bool = True
    num_class_images: int = 50
    seed: int = 0
    preview_every: int = 100
    preview_prompt: str = ""  # empty: the instance prompt
    preview_images: int = 2
    preview_steps: int = 25
    guidance_scale: float = 5.0
    checkpoint_every: int | None = None  # default: preview_every

    def validated(self) -> TrainSpec:
        spec = copy.deepcopy(self)
        spec.adapter_name = check_name(spec.adapter_name)
        if spec.method not in METHODS:
            raise StudioError(f"method {spec.method!r}: choose ETHER or ETHER+")
        spec.method = METHODS[spec.method]
        if not spec.instance_prompt or not spec.instance_prompt.strip():
            raise StudioError("the instance prompt is empty: name the subject with an identifier, e.g. 'a sks dog'")
        if spec.prior_preservation and not spec.class_prompt.strip():
            raise StudioError("prior preservation needs a class prompt without the identifier, e.g. 'a dog'")
        for name, low, high in (
            ("max_train_steps", 1, 100_000),
            ("n_blocks", 1, 64),
            ("preview_every", 1, 100_000),
            ("preview_images", 1, 8),
            ("preview_steps", 1, 200),
            ("num_class_images", 1, 1000),
        ):
            value = getattr(spec, name)
            if value is None or int(value) != value or not low <= int(value) <= high:
                raise StudioError(f"{name.replace('_', ' ')} must be a whole number from {low} to {high}")
            setattr(spec, name, int(value))
        if not 0 < float(spec.learning_rate) <= 1:
            raise StudioError("the learning rate must be above 0 and at most 1 (the paper uses 6e-3)")
        if spec.subject is None and not spec.uploads:
            raise StudioError("no images: upload 3-10 images of your subject, or pick a shipped one")
        if spec.subject is not None and spec.subject not in shipped_subjects():
            raise StudioError(f"no shipped subject {spec.subject!r}; choose one of {sorted(shipped_subjects())}")
        return spec

    def argv(self, model: str, instance_dir: Path, output_dir: Path, resume: bool) -> list[str]:
        """The flags of the library loop (``training.dreambooth.build_parser``) for this job."""
        every = self.checkpoint_every or self.preview_every
        argv = [
            "--pretrained_model_name_or_path", model,
            "--instance_data_dir", str(instance_dir),
            "--instance_prompt", self.instance_prompt.strip(),
            "--ether_method", self.method,
            "--n_blocks", str(self.n_blocks),
            "--max_train_steps", str(self.max_train_steps),
            "--learning_rate", repr(float(self.learning_rate)),
            "--seed", str(int(self.seed)),
            "--checkpointing_steps", str(every),
            "--checkpoints_total_limit", "2",
            "--validation_prompt", (self.preview_prompt or self.instance_prompt).strip(),
            "--validation_steps", str(self.preview_every),
            "--num_validation_images", str(self.preview_images),
            "--validation_inference_steps", str(self.preview_steps),
            "--validation_guidance_scale", repr(float(self.guidance_scale)),
            "--adapter_name", self.adapter_name,
            "--output_dir", str(output_dir),
            "--random_flip",
            "--report_to", "none",
            "--quiet",
        ]  # fmt: skip
        if self.prior_preservation:
            argv += ["--with_prior_preservation", "--class_prompt", self.class_prompt.strip()]
            argv += ["--num_class_images", str(self.num_class_images)]
        if resume:
            argv += ["--resume_from_checkpoint", "latest"]
        return argv


class JobManager:
    """Starts, watches, stops and resumes training jobs; ``status()`` is what the page polls."""

    def __init__(self, workspace: Workspace, model: str | Path, store: AdapterStore | None = None):
        self.workspace = workspace
        self.model = str(model)
        self.store = store or AdapterStore(workspace)
        self._lock = threading.Lock()  # guards the state
        self._launching = threading.Lock()  # Start and Resume from two pages at once: still one job
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state: dict | None = None
        self._last_write = 0.0
        self._load_latest()

    # --- state -------------------------------------------------------------------------------------------------
    def _job_dir(self, job_id: str | None = None) -> Path:
        return inside(self.workspace.jobs, job_id or self._state["id"])

    def _load_latest(self) -> None:
        states = []
        for path in self.workspace.jobs.glob(f"*/{STATE_FILE}"):
            try:
                states.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # a job folder without readable state is not shown
        if not states:
            return
        self._state = max(states, key=lambda s: s.get("created", 0))
        if self._state["phase"] in ACTIVE_PHASES:  # the studio stopped while it ran
            checkpoint = latest_checkpoint(self._job_dir() / "output")
            at = f"step {checkpoint_step(checkpoint)}" if checkpoint else "the start (no checkpoint yet)"
            self._update(
                phase="interrupted",
                message=f"the studio stopped while this job ran; Resume continues from {at}",
                force=True,
            )

    def _update(self, force: bool = False, **changes) -> None:
        with self._lock:
            self._state.update(changes)
            self._state["updated"] = time.time()
            now = time.monotonic()
            if not (force or "phase" in changes or now - self._last_write > 1.0):
                return
            self._last_write = now
            with atomic_write(self._job_dir() / STATE_FILE) as tmp:
                tmp.write_text(json.dumps(self._state, indent=1))

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> dict:
        """A copy of the current job's state (``{}`` when there has been none), plus ``running``/``resumable``."""
        with self._lock:
            state = copy.deepcopy(self._state) if self._state else {}
        if state:
            state["running"] = self.running()
            state["resumable"] = not state["running"] and state["phase"] in ("stopped", "failed", "interrupted")
        return state

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the job's thread ends (tests, scripts); returns the status."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status()

    def _busy_message(self) -> str:
        s = self.status()
        where = f"step {s.get('step', 0)}/{s.get('total') or '?'}" if s.get("phase") == "training" else s.get("phase")
        return (
            f"a training job is already running ('{s['spec']['adapter_name']}', {where}); one job at a time: "
            "stop it or wait until it finishes"
        )

    # --- actions -----------------------------------------------------------------------------------------------
    def start(self, spec: TrainSpec) -> dict:
        """Check ``spec`` and start it in the background; StudioError if busy or the input is bad."""
        with self._launching:
            return self._start(spec)

    def resume(self) -> dict:
        """Continue the last stopped, failed or interrupted job from its latest checkpoint."""
        with self._launching:
            return self._resume()

    def _start(self, spec: TrainSpec) -> dict:
        from ..training.dreambooth import build_parser, validate_args

        if self.running():
            raise StudioError(self._busy_message())
        spec = spec.validated()
        if self.store.exists(spec.adapter_name):
            raise StudioError(
                f"an adapter named {spec.adapter_name!r} already exists; choose another name or delete it first"
            )
        job_id = time.strftime("%Y%m%d-%H%M%S-") + spec.adapter_name
        n = 1
        while (self.workspace.jobs / job_id).exists():
            n += 1
            job_id = f"{time.strftime('%Y%m%d-%H%M%S-')}{spec.adapter_name}-{n}"
        job_dir = inside(self.workspace.jobs, job_id)
        job_dir.mkdir()
        if spec.subject is not None:
            instance_dir = Path(shipped_subjects()[spec.subject]["folder"])
        else:
            try:
                save_uploads(spec.uploads, job_dir / "instance")
            except StudioError:
                _remove_tree(job_dir)
                raise
            instance_dir = job_dir / "instance"
        spec.uploads = []
        try:  # the loop's own checks, before anything runs in the background
            validate_args(build_parser().parse_args(spec.argv(self.model, instance_dir, job_dir / "output", False)))
        except ValueError as err:
            _remove_tree(job_dir)
            raise StudioError(str(err)) from err
        self._state = {
            "id": job_id,
            "created": time.time(),
            "spec": asdict(spec),
            "instance_dir": str(instance_dir),
            "phase": "preparing",
            "step": 0,
            "start_step": 0,
            "total": spec.max_train_steps,
            "loss": None,
            "lr": None,
            "eta_seconds": None,
            "losses": [],
            "previews": [],
            "adapter": None,
            "error": None,
            "message": "",
        }
        self._launch(resume=False)
        return self.status()

    def stop(self) -> dict:
        if not self.running():
            raise StudioError("no training job is running")
        self._stop.set()
        self._update(phase="stopping", message="stopping after the current step; the adapter so far will be saved")
        return self.status()

    def _resume(self) -> dict:
        if self.running():
            raise StudioError(self._busy_message())
        state = self.status()
        if not state:
            raise StudioError("there is no job to resume; start one")
        if not state["resumable"]:
            raise StudioError(
                f"the last job ('{state['spec']['adapter_name']}') finished all {state['total']} steps; start a new "
                "job to train more"
            )
        self._launch(resume=True)
        return self.status()

    # --- the thread --------------------------------------------------------------------------------------------
    def _launch(self, resume: bool) -> None:
        prior = self._state["spec"]["prior_preservation"]
        what = "loading the base model" + (
            f" and drawing {self._state['spec']['num_class_images']} class images" if prior and not resume else ""
        )
        self._stop.clear()
        self._update(phase="preparing", error=None, message=what + ("; resuming" if resume else ""), force=True)
        self._thread = threading.Thread(target=self._run, args=(resume,), name="studio-training", daemon=True)
        self._thread.start()

    def _run(self, resume: bool) -> None:
        from ..training.dreambooth import TrainCallbacks, build_parser, train, validate_args

        spec = TrainSpec(**self._state["spec"])
        output_dir = self._job_dir() / "output"
        clock = {"start": time.monotonic(), "first_step": 0}
        last_images: list = []

        def on_start(total: int, start_step: int) -> None:
            clock["start"], clock["first_step"] = time.monotonic(), start_step
            previews = [p for p in self._state["previews"] if p["step"] <= start_step] if start_step else []
            message = f"resumed at step {start_step}" if start_step else "training"
            self._update(phase="training", total=total, step=start_step, start_step=start_step, previews=previews,
                         losses=self._state["losses"][:start_step], message=message)  # fmt: skip

        def on_step(step: int, logs: dict) -> None:
            done = step - clock["first_step"]
            per_step = (time.monotonic() - clock["start"]) / max(done, 1)
            losses = self._state["losses"] + [round(logs["loss"], 6)]
            self._update(step=step, loss=logs["loss"], lr=logs["lr"], losses=losses,
                         eta_seconds=per_step * (self._state["total"] - step))  # fmt: skip

        def on_validation(step: int, images, paths) -> None:
            final = Path(paths[0]).name == "samples.png"  # the loop's last call: a grid from the reloaded file
            caption = f"step {step} · saved adapter, reloaded" if final else f"step {step}"
            if step == 0:
                caption = "step 0 · base model (baseline)"
            if final:  # the next run of the loop writes samples.png again: keep this one under its own name
                kept = self._job_dir() / "previews" / f"step-{step:06d}-saved.png"
                kept.parent.mkdir(exist_ok=True)
                shutil.copyfile(paths[0], kept)
                paths = [kept]
            last_images[:] = images
            previews = self._state["previews"] + [{"path": str(paths[0]), "caption": caption, "step": step}]
            previews += [{"path": str(p), "caption": caption, "step": step} for p in paths[1:]]
            self._update(previews=previews, phase="saving" if final else self._state["phase"], force=True)

        def should_stop() -> bool:
            return self._stop.is_set()

        try:
            args = validate_args(build_parser().parse_args(
                spec.argv(self.model, Path(self._state["instance_dir"]), output_dir, resume)))  # fmt: skip
            result = train(args, TrainCallbacks(on_start, on_step, on_validation, should_stop))
            self._update(phase="saving", message="publishing the adapter")
            name = self._state["adapter"] or spec.adapter_name
            if self.store.exists(name) and not self._state["adapter"]:
                name = self.store.free_name(name)  # the name was taken while the job ran
            self.store.publish(result.adapter_path, name, thumbnail=last_images[0] if last_images else None,
                               replace=True)  # fmt: skip
            stopped = result.stopped_early
            self._update(
                phase="stopped" if stopped else "done",
                step=result.global_step,
                adapter=name,
                eta_seconds=None,
                message=(
                    f"stopped at step {result.global_step}: adapter '{name}' saved; Resume continues from here"
                    if stopped
                    else f"finished {result.global_step} steps in {result.train_seconds:.0f} s: adapter '{name}' saved"
                ),
            )
        except BaseException as err:  # every failure reaches the page; the thread never dies silently
            self._update(
                phase="failed",
                error=f"{type(err).__name__}: {err}",
                traceback=traceback.format_exc()[-4000:],
                eta_seconds=None,
                message="training failed; fix the cause, then Resume (from the last checkpoint) or start anew",
            )


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
