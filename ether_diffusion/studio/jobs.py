"""Background training for the studio: one job at a time on the library's training loop.

A job is a folder ``<workspace>/jobs/<id>/`` holding ``state.json`` (what the page shows), the instance images
when they were uploaded, and ``output/``, the loop's output folder (checkpoints, previews, TensorBoard logs in
``output/logs``, the adapter). A job is a run configuration built from the form (no command line in between):
``TrainSpec`` makes a ``DreamBoothConfig``, ``ControlSpec`` (``studio/control.py``) a ``ControlConfig``. It runs in a
thread with a ``Callback``: each preparation phase (with its progress) and step updates the state (message, step,
loss, the losses so far, lr, ETA from training steps only), each preview adds to the gallery. ``stop`` acts at once
in every phase: between preparation phases, between the denoising steps of class images and previews
(``sampling.interruptible``), or after the current training step; a job stopped after its first step keeps the
adapter so far and a checkpoint to resume from. ``resume`` runs the loop again from the latest checkpoint. Every
exception ends the job as ``failed`` with its message on the page; a studio that dies mid-job finds the job
``interrupted`` on restart, resumable from its last checkpoint.

    preparing ─► training ─► saving ─► done
        │            │ stop ─► stopping ─► stopped ─┐
        └────────────┴──► failed                   ├─► resume ─► preparing …
                 (studio restarted) ─► interrupted ─┘
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import shutil
import threading
import time
import traceback
from dataclasses import KW_ONLY, asdict, dataclass, field
from pathlib import Path

from ..assets import default_subjects_path
from ..checkpoints import checkpoint_step, latest_checkpoint
from ..files import atomic_write
from ..registry import train
from ..training.callbacks import Callback
from ..training.config import ETHER_METHODS, ConfigError, TaskKind
from ..training.data import IMAGE_EXTENSIONS
from ..training.dreambooth import PAPER_LEARNING_RATE, DreamBoothConfig
from ..training.task import SampleKind
from .adapters import AdapterStore
from .control import ControlSpec, check_dataset_folder
from .estimate import measure, project
from .forms import FormSpec, check_whole_numbers
from .uploads import save_uploads
from .workspace import StudioError, Workspace, check_name, inside, slug

__all__ = ["ACTIVE_PHASES", "SPECS", "JobManager", "TrainSpec", "shipped_subjects"]

ACTIVE_PHASES = ("preparing", "training", "stopping", "saving")
PHASES = (*ACTIVE_PHASES, "done", "stopped", "failed", "interrupted")
STATE_FILE = "state.json"
MAX_STATE_BYTES = 64 * 2**20  # a 100,000-step job's losses and previews are a few MB; more is not a state


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def shipped_subjects() -> dict[str, dict]:
    """``{name: subject.json record + "folder"}`` for the subjects shipped in ``assets/subjects``."""
    found = {}
    root = default_subjects_path()
    for meta in sorted(root.glob("*/subject.json")) if root.is_dir() else []:
        record = json.loads(meta.read_text())
        record["folder"] = str(meta.parent)
        found[meta.parent.name] = record
    return found


@dataclass
class TrainSpec(FormSpec):
    """What the Train tab asks for: the shared settings (``FormSpec``) and the DreamBooth ones. ``subject`` (a
    shipped one) or ``uploads`` (3-10 image files); ``adapter_name`` and ``instance_prompt`` may be given by
    position."""

    kind = TaskKind.DREAMBOOTH
    WHOLE_NUMBERS = {"num_class_images": (1, 1000)}
    LEARNING_RATES = {"learning_rate": PAPER_LEARNING_RATE}

    instance_prompt: str
    _: KW_ONLY
    subject: str | None = None
    uploads: list[str] = field(default_factory=list)
    class_prompt: str = ""
    max_train_steps: int = 400
    learning_rate: float = PAPER_LEARNING_RATE
    prior_preservation: bool = True
    num_class_images: int = 50
    checkpoint_every: int | None = None  # default: preview_every

    def validated(self) -> TrainSpec:
        spec = super().validated()
        if not isinstance(spec.instance_prompt, str) or not spec.instance_prompt.strip():
            raise StudioError("the instance prompt is empty: name the subject with an identifier, e.g. 'a sks dog'")
        if spec.prior_preservation and not (spec.class_prompt or "").strip():
            raise StudioError("prior preservation needs a class prompt without the identifier, e.g. 'a dog'")
        if spec.subject is None and not spec.uploads:
            raise StudioError("no images: upload 3-10 images of your subject, or pick a shipped one")
        if spec.subject is not None and spec.subject not in shipped_subjects():
            raise StudioError(f"no shipped subject {spec.subject!r}; choose one of {sorted(shipped_subjects())}")
        return spec

    def config(self, model: str, instance_dir: Path, output_dir: Path, class_dir: Path, resume: bool,
               model_config: str | None = None, report_to: str = "none"):  # fmt: skip
        """The library's DreamBooth configuration for this job (no command line in between)."""
        every = self.checkpoint_every or self.preview_every
        return DreamBoothConfig(
            pretrained_model_name_or_path=model,
            model_config=model_config,
            instance_data_dir=str(instance_dir),
            instance_prompt=self.instance_prompt.strip(),
            ether_method=self.method,
            n_blocks=int(self.n_blocks),
            base_quantization=self.base_quantization,
            max_train_steps=int(self.max_train_steps),
            learning_rate=float(self.learning_rate),
            seed=int(self.seed),
            checkpointing_steps=int(every),
            checkpoints_total_limit=2,
            validation_prompt=(self.preview_prompt or self.instance_prompt).strip(),
            validation_steps=int(self.preview_every),
            num_validation_images=int(self.preview_images),
            validation_inference_steps=int(self.preview_steps),
            validation_guidance_scale=float(self.guidance_scale),
            adapter_name=self.adapter_name,
            output_dir=str(output_dir),
            random_flip=True,
            report_to=report_to,
            quiet=True,
            with_prior_preservation=bool(self.prior_preservation),
            class_prompt=self.class_prompt.strip() or None,
            num_class_images=int(self.num_class_images),
            class_data_dir=str(class_dir),
            resume_from_checkpoint="latest" if resume else None,
        )

    @staticmethod
    def train(config, callbacks):
        return train(config, callbacks)


SPECS = {spec.kind: spec for spec in (TrainSpec, ControlSpec)}  # a job's "kind" -> its spec class


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: the fields of a state the studio reads, each with the test its value passes where present
STATE_FIELDS = {
    "created": _number, "step": _whole, "start_step": _whole, "total": lambda v: v is None or _whole(v),
    "loss": lambda v: v is None or _number(v), "lr": lambda v: v is None or _number(v),
    "eta_seconds": lambda v: v is None or _number(v), "losses": lambda v: isinstance(v, list) and all(map(_number, v)),
    "previews": lambda v: isinstance(v, list) and all(isinstance(p, dict) and isinstance(p.get("path"), str)
                                                     and isinstance(p.get("caption"), str) and _whole(p.get("step"))
                                                     for p in v),
    "message": lambda v: isinstance(v, str), "error": lambda v: v is None or isinstance(v, str),
    "logs": lambda v: v is None or isinstance(v, str), "adapter": lambda v: v is None or isinstance(v, str),
}  # fmt: skip


def check_state(state, job_dir: Path, phases: tuple[str, ...] = PHASES) -> str | None:
    """Why ``state`` (a parsed ``state.json`` of ``job_dir``) is not a job's state the studio can show and resume,
    or None: its id is its folder's name, its kind a form's, its phase one of ``phases``, its spec that form's fields
    (a known method, whole numbers in range), and every other field it has of the type ``STATE_FIELDS`` says."""
    if not isinstance(state, dict):
        return "it is not a JSON object"
    if state.get("id") != job_dir.name:
        return f"its id {state.get('id')!r:.40} is not its folder's name"
    kind = state.get("kind", TrainSpec.kind)
    if not isinstance(kind, str) or kind not in SPECS:
        return f"its kind {kind!r:.40} is not one of {', '.join(map(str, SPECS))}"
    if state.get("phase") not in phases:
        return f"its phase {state.get('phase')!r:.40} is not one of {', '.join(phases)}"
    bad = sorted(name for name, valid in STATE_FIELDS.items() if name in state and not valid(state[name]))
    if bad:
        return f"its {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} of the wrong type"
    if state.get("total") and "step" not in state:
        return "it has a total but no step"
    if not isinstance(state.get("spec"), dict):
        return "it has no settings (spec)"
    try:
        spec = SPECS[kind](**state["spec"])
        check_name(spec.adapter_name)
        if spec.method not in ETHER_METHODS:
            raise StudioError(f"method {spec.method!r:.40} is not one of {', '.join(ETHER_METHODS)}")
        check_whole_numbers(copy.copy(spec), **spec.ranges())
    except (TypeError, ValueError) as err:  # StudioError is a ValueError
        return f"its settings are not a {kind} form's ({str(err)[:120]})"
    return None


def read_states(folder: Path, phases: tuple[str, ...] = PHASES) -> tuple[list[dict], list[str]]:
    """The states of ``folder``'s jobs (``<id>/state.json``) that are jobs' states (``check_state``), and a line for
    each one skipped, with why: nothing unreadable, oversized or of another shape is shown or resumed."""
    states, skipped = [], []
    for path in sorted(folder.glob(f"*/{STATE_FILE}")):
        why = None
        try:
            if path.stat().st_size > MAX_STATE_BYTES:
                why = f"it is {path.stat().st_size / 2**20:.0f} MB; a job's state is far smaller"
            else:
                state = json.loads(path.read_text())
        except RecursionError:
            why = "its JSON is nested deeper than any job's state"
        except (OSError, ValueError) as err:
            why = f"it is not readable JSON ({str(err)[:80]})"
        why = why or check_state(state, path.parent, phases)
        if why is not None:
            skipped.append(f"'{path}' is not a job's state ({why}): the job is not shown")
            continue
        states.append(state)
    return states, skipped


def new_job_id(folder: Path, name: str) -> str:
    """``<time>-<name>``, with ``-2``, ``-3`` ... while ``folder`` has a job of that id."""
    stamp = time.strftime("%Y%m%d-%H%M%S-")
    job_id, n = stamp + name, 1
    while (folder / job_id).exists():
        n += 1
        job_id = f"{stamp}{name}-{n}"
    return job_id


class JobManager:
    """Starts, watches, stops and resumes training jobs; ``status()`` is what the page polls."""

    def __init__(self, workspace: Workspace, model: str | Path, store: AdapterStore | None = None,
                 model_config: str | None = None, check_adapter=None):  # fmt: skip
        """``model``: a diffusers folder, hub id or single checkpoint file (then ``model_config``: a local diffusers
        folder of its architecture, for loading offline). ``check_adapter(EtherConfig)``, when given, checks a job's
        adapter against the model at Start (``Sampler.check_adapter_config``: Blocks that do not divide a width)."""
        self.check_adapter = check_adapter
        self.workspace = workspace
        self.model = str(model)
        self.model_config = model_config
        self.store = store or AdapterStore(workspace)
        self._lock = threading.Lock()  # guards the state
        self._launching = threading.Lock()  # Start and Resume from two pages at once: still one job
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state: dict | None = None
        self._last_write = 0.0
        self.skipped: list[str] = []  # job folders whose state.json could not be read, with why
        self.queue = None  # the workspace's JobQueue (``studio/queue.py``), which sets itself here
        self._load_latest()

    # --- state -------------------------------------------------------------------------------------------------
    def _job_dir(self, job_id: str | None = None) -> Path:
        return inside(self.workspace.jobs, job_id or self._state["id"])

    def _load_latest(self) -> None:
        """The newest job whose ``state.json`` is a job's state; each other one is skipped with why (``skipped``)."""
        states, skipped = read_states(self.workspace.jobs)
        self.skipped += skipped
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
            if changes.get("phase") in ("preparing", "training") and self._stop.is_set():
                changes["phase"] = "stopping"  # a stop was asked: the label never goes back
            if changes.get("phase") == "stopping" and self._state["phase"] not in ACTIVE_PHASES:
                return  # the job ended while Stop was pressed: its end stands
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
            state["kind"] = TaskKind(state.get("kind", TrainSpec.kind))  # a job without "kind" is a DreamBooth one
            state["running"] = self.running()
            state["resumable"] = not state["running"] and state["phase"] in ("stopped", "failed", "interrupted")
        return state

    def wait(self, timeout: float | None = None) -> dict:
        """Block until the job's thread ends (tests, scripts); returns the status."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.status()

    def spec(self) -> TrainSpec | ControlSpec | None:
        """The current (or last) job's settings, as its spec: what the page fills its form with after a reload."""
        state = self.status()
        return SPECS[state["kind"]](**state["spec"]) if state else None

    def _busy_message(self) -> str:
        s = self.status()
        where = f"step {s.get('step', 0)}/{s.get('total') or '?'}" if s.get("phase") == "training" else s.get("phase")
        return (
            f"a training job is already running ('{s['spec']['adapter_name']}', {where}); one job at a time: "
            "stop it or wait until it finishes"
        )

    # --- actions -----------------------------------------------------------------------------------------------
    def start(self, spec: TrainSpec | ControlSpec) -> dict:
        """Check ``spec`` and start it in the background; StudioError if busy or the input is bad."""
        with self._launching:
            return self._start(spec)

    def resume(self) -> dict:
        """Continue the last stopped, failed or interrupted job from its latest checkpoint."""
        with self._launching:
            return self._resume()

    def _queue_busy(self) -> None:
        if self.queue is not None and self.queue.running():
            raise StudioError("the queue is training; one training at a time: Stop queue or wait until it ends")

    def _start(self, spec: TrainSpec) -> dict:
        if self.running():
            raise StudioError(self._busy_message())
        self._queue_busy()
        spec = spec.validated()
        if self.store.exists(spec.adapter_name):
            raise StudioError(
                f"an adapter named {spec.adapter_name!r} already exists; choose another name or delete it first"
            )
        job_id = new_job_id(self.workspace.jobs, spec.adapter_name)
        job_dir = inside(self.workspace.jobs, job_id)
        job_dir.mkdir()
        try:
            inputs = self._inputs(spec, job_dir)
            config = self._config(spec, inputs, job_dir, resume=False).validate()  # the loop's checks, before it runs
            if self.check_adapter is not None:
                self.check_adapter(config.adapter_config())
        except (StudioError, ConfigError) as err:
            _remove_tree(job_dir)
            raise StudioError(str(err)) from err
        if isinstance(spec, TrainSpec):
            spec.uploads = []  # temporary files of the page; the job has its copies
        self._state = {
            "id": job_id,
            "kind": str(spec.kind),
            "created": time.time(),
            "spec": asdict(spec),
            **inputs,
            "logs": str(job_dir / "output" / "logs") if self._report_to() != "none" else None,
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

    def estimate(self, spec: TrainSpec | ControlSpec):
        """Time and memory ``spec`` will need, measured by running a few of its steps on the loaded model
        (``studio/estimate.py``); refused while a job runs (each would slow the other and the figure)."""
        import tempfile

        with self._launching:
            if self.running():
                raise StudioError(
                    "a training job is running: its ETA is on the page. Estimate when it has ended (measuring now "
                    "would slow it down and be slowed down by it)"
                )
            self._queue_busy()
            spec = spec.validated()
            with tempfile.TemporaryDirectory(prefix=".estimate-", dir=self.workspace.root) as scratch:
                inputs = self._inputs(spec, Path(scratch))
                config = self._config(spec, inputs, Path(scratch), resume=False)
                try:
                    config.validate()
                except ValueError as err:
                    raise StudioError(str(err)) from err
                measured = _in_a_thread(measure, config, Path(scratch))  # as the job will run: not the main thread
        missing = 0
        if isinstance(spec, TrainSpec) and spec.prior_preservation:
            folder = self._class_dir(spec)
            drawn = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS] if folder.is_dir() else []
            missing = max(spec.num_class_images - len(drawn), 0)
        return project(spec, measured, missing)

    def stop(self) -> dict:
        """Ask the job to stop: it does within the current training or denoising step, in every phase."""
        if not self.running():
            raise StudioError("no training job is running")
        self._stop.set()
        trained = self.status().get("step", 0) > self.status().get("start_step", 0)
        message = "stopping now; the adapter so far will be saved" if trained else "stopping now"
        self._update(phase="stopping", message=message, eta_seconds=None)
        return self.status()

    def _resume(self) -> dict:
        if self.running():
            raise StudioError(self._busy_message())
        self._queue_busy()
        state = self.status()
        if not state:
            raise StudioError("there is no job to resume; start one")
        if not state["resumable"]:
            raise StudioError(
                f"the last job ('{state['spec']['adapter_name']}') finished all {state['total']} steps; start a new "
                "job to train more"
            )
        spec = self.spec()
        if isinstance(spec, ControlSpec) and spec.source == "folder":
            check_dataset_folder(spec.data_dir)  # changed since the job started? its files must still be inside it
        self._launch(resume=True)
        return self.status()

    # --- the thread --------------------------------------------------------------------------------------------
    def _class_dir(self, spec: TrainSpec) -> Path:
        """Class images are the base model's: jobs with the same model, class prompt and sampling share them."""
        key = f"{self.model}|{spec.class_prompt.strip()}|{spec.seed}|{spec.preview_steps}|{spec.guidance_scale}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:10]
        return inside(self.workspace.class_images, f"{slug(spec.class_prompt.strip(), 'class')[:40]}-{digest}")

    def _inputs(self, spec: TrainSpec | ControlSpec, job_dir: Path) -> dict:
        """Where the job's data is (saved uploads, a shipped subject, a rendered world set), kept in its state."""
        if isinstance(spec, ControlSpec):
            return spec.inputs(self.workspace)
        if spec.subject is not None:
            return {"instance_dir": shipped_subjects()[spec.subject]["folder"]}
        save_uploads(spec.uploads, job_dir / "instance")
        return {"instance_dir": str(job_dir / "instance")}

    def _report_to(self) -> str:
        return "tensorboard" if tensorboard_available() else "none"

    def _config(self, spec: TrainSpec | ControlSpec, inputs: dict, job_dir: Path, resume: bool):
        output = job_dir / "output"
        if isinstance(spec, ControlSpec):
            return spec.config(self.model, inputs, output, resume, self.model_config, self._report_to())
        return spec.config(self.model, Path(inputs["instance_dir"]), output, self._class_dir(spec), resume,
                           self.model_config, self._report_to())  # fmt: skip

    def _launch(self, resume: bool) -> None:
        self._stop.clear()
        message = "loading the base model" + ("; resuming" if resume else "")
        self._update(phase="preparing", error=None, message=message, force=True)
        self._thread = threading.Thread(target=self._run, args=(resume,), name="studio-training", daemon=True)
        self._thread.start()

    def _run(self, resume: bool) -> None:
        spec = self.spec()
        callback = _JobCallback(self)
        try:
            config = self._config(spec, self._state, self._job_dir(), resume)
            result = spec.train(config, [callback])
            if result.adapter_path is None:  # stopped before the first step: nothing trained, nothing to publish
                self._update(phase="stopped", eta_seconds=None,
                             message="stopped before training began; Resume starts it")  # fmt: skip
                return
            self._update(phase="saving", message="publishing the adapter")
            name = self._publish(result.adapter_path, spec, callback.last_images)
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

    def _publish(self, adapter_path: Path, spec: TrainSpec, last_images: list) -> str:
        """Copy the trained file into the store. A job owns the file it published (found by its content, even if
        renamed since), never a name: a file someone else put under the job's name is left alone."""
        previous = self._state.get("adapter_digest")
        name = self.store.find(previous) if previous else None
        if name is None:
            wanted = spec.adapter_name
            name = wanted if not self.store.exists(wanted) else self.store.free_name(wanted)
        self.store.publish(adapter_path, name, thumbnail=last_images[0] if last_images else None, replace=True)
        self._update(adapter=name, adapter_digest=self.store.digest(name), force=True)
        return name


class _JobCallback(Callback):
    """The loop's events as the job's state: phase, progress, previews, stop."""

    def __init__(self, manager: JobManager):
        self.manager = manager
        self.last_images: list = []
        self.clock: tuple[float, int] | None = None  # (time, step) when the timed stretch began
        self.last_step_at: float | None = None  # when the last step ended: what follows it until a preview is not ETA

    def _phase(self, wanted: str) -> str:
        return "stopping" if self.manager._stop.is_set() else wanted

    def on_prepare(self, preparation) -> None:
        message = preparation.message
        if preparation.total:
            message += f" ({preparation.done}/{preparation.total})"
        self.manager._update(phase=self._phase("preparing"), message=message)

    def on_train_start(self, total: int, start_step: int) -> None:
        state = self.manager._state
        previews = [p for p in state["previews"] if p["step"] <= start_step] if start_step else state["previews"]
        self.clock = (time.monotonic(), start_step)
        self.manager._update(phase=self._phase("training"), total=total, step=start_step, start_step=start_step,
                             previews=previews, losses=state["losses"][:start_step], eta_seconds=None,
                             message=f"resumed at step {start_step}" if start_step else "training")  # fmt: skip

    def on_step(self, step: int, logs: dict) -> None:
        state = self.manager._state
        started, first = self.clock or (time.monotonic(), step - 1)
        self.last_step_at = time.monotonic()
        per_step = (self.last_step_at - started) / max(step - first, 1)  # training steps only: no preview
        previewing = step % state["spec"]["preview_every"] == 0
        self.manager._update(step=step, loss=logs["loss"], lr=logs["lr"],
                             losses=state["losses"] + [round(logs["loss"], 6)],
                             eta_seconds=per_step * (state["total"] - step),
                             message=f"sampling the step-{step} preview" if previewing else "training")  # fmt: skip

    def on_validation(self, event) -> None:
        manager = self.manager
        if event.kind is SampleKind.PREVIEW and self.clock and self.last_step_at is not None:
            started, first = self.clock  # the preview's sampling (and a checkpoint before it) is not training time
            self.clock = (started + time.monotonic() - self.last_step_at, first)
        paths = list(event.paths)
        control = TaskKind(manager._state.get("kind", TrainSpec.kind)) is TaskKind.CONTROL
        baseline = "step 0 · untrained" if control else "step 0 · base model (baseline)"
        caption = {SampleKind.BASELINE: baseline, SampleKind.FINAL: f"step {event.step} · saved adapter, reloaded"}.get(
            event.kind, f"step {event.step}"
        )
        if control:
            caption += " · control map | samples"
        if event.kind is SampleKind.FINAL:  # a resumed run writes samples.png again: keep this one under its own name
            kept = manager._job_dir() / "previews" / f"step-{event.step:06d}-saved.png"
            kept.parent.mkdir(exist_ok=True)
            shutil.copyfile(paths[0], kept)
            paths = [kept]
        self.last_images = list(event.images)[1:] if control else list(event.images)  # a control row: map first
        added = [{"path": str(p), "caption": caption, "step": event.step} for p in paths]
        previews = manager._state["previews"] + added
        final = event.kind is SampleKind.FINAL
        phase = "saving" if final else manager._state["phase"]
        message = "publishing the adapter" if final else "training"
        manager._update(previews=previews, phase=phase, message=message, force=True)

    def on_save(self, path) -> None:
        stopping = self.manager._stop.is_set()  # a stopped run skips the reload check
        self.manager._update(phase="saving", message="adapter written" + ("" if stopping else "; sampling it reloaded "
                                                                          "into a fresh pipeline"))  # fmt: skip

    def should_stop(self) -> bool:
        return self.manager._stop.is_set()


def _in_a_thread(function, *args):
    """``function(*args)`` run in a new thread, as a job runs. It matters for timing: on the shared 2-core machine,
    torch ran the same training steps up to 8× faster or slower in another thread than in the main thread (its
    intra-op threads spin differently under contention), so a measurement is only as good as its likeness."""
    box = {}

    def work():
        try:
            box["value"] = function(*args)
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller)
            box["error"] = err

    thread = threading.Thread(target=work, name="studio-estimate", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
