"""ETHER Studio: train, sample and manage ETHER adapters in the browser.

    ether-diffusion studio [--host 127.0.0.1] [--port 7860] [--model assets/tiny-sd] [--workdir outputs/studio]
                           [--auth USER:PASSWORD | --auth_file FILE | --insecure_no_auth]

or ``python -m ether_diffusion.studio.ui`` (``app/app.py`` in a checkout) with the same flags. Without ``--model``
the studio opens the shipped tiny model, which a checkout has (``assets/tiny-sd``) and an installed wheel has not:
there it says to pass ``--model``. This is the one module of the studio that imports gradio: it only lays out
widgets and wires events; the work (training jobs, presets, estimates, adapters, sampling, control) is in the
rest of ``ether_diffusion.studio``, tested without a browser. One function per tab: ``train_tab``,
``control_tab``, ``sample_tab``, ``adapters_tab``; the settings the Train and Control forms share (``FormSpec``) are
built by the same functions (``method_row``, ``learning_rate_box``, ``previews_accordion``) and read back by
``read_form``.

Failures are shown in the note beside the button that caused them (``inline_errors``), never as pop-ups and
never by turning the other outputs into error boxes: whatever was on the page stays.
"""

from __future__ import annotations

import argparse
import functools
import html
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the studio works offline

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402  (gradio's own dependency; the loss curve's data)

from ..assets import default_model_path, default_subjects_path  # noqa: E402
from ..config import METHOD_LABELS, EtherConfig  # noqa: E402
from ..control.train import ControlConfig  # noqa: E402
from ..demo import DEFAULT_SUBJECT  # noqa: E402
from ..training.config import ETHER_METHODS, TaskKind, adapter_targets  # noqa: E402
from ..training.dreambooth import DreamBoothConfig  # noqa: E402
from .access import accounts, check_exposure  # noqa: E402
from .adapters import TABLE_HEADERS, AdapterStore  # noqa: E402
from .control import ControlSpec, example_control, palette_colors  # noqa: E402
from .forms import METHODS, FormSpec, short_rate  # noqa: E402
from .jobs import JobManager, TrainSpec, shipped_subjects  # noqa: E402
from .presets import PresetStore  # noqa: E402
from .queue import QUEUE_HEADERS, JobQueue  # noqa: E402
from .sampling import ControlRequest, Sampler, SampleRequest, parse_seeds  # noqa: E402
from .workspace import StudioError, Workspace  # noqa: E402

SHIPPED, UPLOAD = "Shipped subject", "My images"
NO_ADAPTER = "(none)"
ADAPTER_SLOTS = 3
CANVAS = 256  # pixels of the control canvas; maps are resized (nearest) to the model's size, and the page says so
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: nothing is fetched from outside
SOURCE_LABELS = {"segmentation": "Tiny world: segmentation", "edges": "Tiny world: edges",
                 "folder": "Dataset folder (metadata.jsonl)"}  # fmt: skip
CURVE_COLOURS = {"loss": "#a5b4fc", "smoothed": "#4338ca"}  # the raw loss light, its running mean dark
METHOD_CHOICES = [METHOD_LABELS[m] for m in ETHER_METHODS]
EXPECTED = (StudioError, ValueError, KeyError, FileNotFoundError, PermissionError)  # messages meant for the page


def error_note(err: BaseException) -> str:
    if isinstance(err, EXPECTED):
        message = str(err).strip("'\"")
    else:
        traceback.print_exception(err)
        message = f"{type(err).__name__}: {err}"
    return f'<div class="studio-error" role="alert"><b>Error:</b> {html.escape(message)}</div>'


def inline_errors(note: int, outputs: int):
    """A failure of the handler becomes a message in its output number ``note`` (of ``outputs``); every other output
    is left as it was (``gr.skip``): no component turns into an "Error" box, no pop-up covers the page."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001  (every failure reaches the page)
                values = [gr.skip()] * outputs
                values[note] = error_note(err)
                return values[0] if outputs == 1 else tuple(values)

        return wrapper

    return decorate


def format_status(state: dict) -> str:
    if not state:
        return "No training job yet. Pick a subject or upload images, then **Start**."
    spec = state["spec"]
    method = METHOD_LABELS[spec["method"]]
    kind = "control" if TaskKind(state.get("kind", TaskKind.DREAMBOOTH)) is TaskKind.CONTROL else "DreamBooth"
    lines = [f"**{spec['adapter_name']}** · {kind} · {method} · job `{state['id']}`", f"**{state['phase']}**"]
    if state.get("total"):
        parts = [f"step **{state['step']} / {state['total']}**"]
        if state.get("loss") is not None:
            parts.append(f"loss {state['loss']:.4f}")
        if state.get("lr") is not None:
            parts.append(f"lr {state['lr']:.2e}")
        if state.get("eta_seconds") is not None and state["phase"] == "training":
            eta = int(state["eta_seconds"])
            parts.append(f"ETA {eta // 60}:{eta % 60:02d}")
        lines.append(" · ".join(parts))
    if state.get("message"):
        lines.append(state["message"])
    if state.get("error"):
        lines.append(f"**Error:** `{state['error']}`")
    if state.get("logs"):
        lines.append(f"TensorBoard: `tensorboard --logdir {state['logs']}`")
    return "\n\n".join(lines)


def loss_frame(losses: list[float]) -> pd.DataFrame | None:
    """The loss per step and its running mean (exponential, 0.9), as the loss curve draws them; None (an empty plot)
    before the first step: Gradio's plot draws no lines at all once it has been given an empty table."""
    if not losses:
        return None
    smoothed, value = [], None
    for loss in losses:
        value = loss if value is None else 0.9 * value + 0.1 * loss
        smoothed.append(value)
    steps = list(range(1, len(losses) + 1))
    return pd.DataFrame({"step": steps * 2, "loss": [*losses, *smoothed],
                         "curve": ["loss"] * len(losses) + ["smoothed"] * len(losses)})  # fmt: skip


def shipped_model() -> Path:
    """The shipped tiny model (``assets/tiny-sd``): beside the package in a checkout, absent from an installed
    wheel, where StudioError says to pass ``--model``."""
    path = default_model_path()
    if not (path / "model_index.json").is_file():
        raise StudioError(
            f"no --model given and the shipped tiny model is not at {path} (it comes with a checkout of "
            "ether-diffusion, not with the installed package): pass --model with a diffusers folder"
        )
    return path


@dataclass
class Studio:
    """The studio's work (``ether_diffusion.studio``) for one model and workspace, shared by every page."""

    model: str
    workspace: Workspace
    store: AdapterStore
    jobs: JobManager
    queue: JobQueue
    sampler: Sampler
    presets: PresetStore
    subjects: dict

    @classmethod
    def open(cls, model: str | Path | None, workdir: str | Path, model_config: str | None = None) -> Studio:
        """The studio on ``model`` (default: the shipped tiny model; StudioError where there is none)."""
        model = str(model or shipped_model())
        workspace = Workspace(workdir)
        store = AdapterStore(workspace)
        sampler = Sampler(model, workspace, store, model_config)
        jobs = JobManager(workspace, model, store, model_config, check_adapter=sampler.check_adapter_config)
        return cls(model, workspace, store, jobs, JobQueue(jobs), sampler, PresetStore(workspace), shipped_subjects())

    def subject_fields(self, name):
        """Adapter name, instance prompt, class prompt and images of shipped subject ``name``."""
        record = self.subjects.get(name)
        if record is None:
            return "", "", "", []
        return (
            self.store.free_name(name),
            record["instance_prompt"],
            record["class_prompt"],
            self.images(record["folder"]),
        )

    @staticmethod
    def images(folder) -> list:
        return [(str(p), p.name) for p in sorted(Path(folder).glob("*.png"))] if folder else []

    def adapter_choices(self, task: TaskKind = TaskKind.DREAMBOOTH) -> list[str]:
        names = self.store.names_for(task)
        return [NO_ADAPTER, *names] if task is TaskKind.DREAMBOOTH else names  # DreamBooth samples with none too


@dataclass
class JobPanel:
    """One tab's view of the (single) training job: buttons, note, estimate, status, loss curve, previews."""

    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    estimate: gr.Button
    note: gr.Markdown
    estimate_text: gr.Markdown
    status: gr.Markdown = None
    loss: gr.LinePlot = None
    previews: gr.Gallery = None


def job_buttons(prefix: str) -> JobPanel:
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id=f"{prefix}start")
        stop = gr.Button("Stop", variant="stop", interactive=False, elem_id=f"{prefix}stop")
        resume = gr.Button("Resume", interactive=False, elem_id=f"{prefix}resume")
        estimate = gr.Button("Estimate time and memory", elem_id=f"{prefix}estimate")
    note = gr.Markdown("", elem_id=f"{prefix}note")
    estimate_text = gr.Markdown("", elem_id=f"{prefix}estimate-text")
    return JobPanel(start, stop, resume, estimate, note, estimate_text)


def job_view(panel: JobPanel, studio: Studio, prefix: str) -> None:
    panel.status = gr.Markdown(format_status(studio.jobs.status()), elem_id=f"{prefix}status")
    panel.loss = gr.LinePlot(None, x="step", y="loss", color="curve", color_map=CURVE_COLOURS, height=220,
                             label="Loss (and its running mean)", elem_id=f"{prefix}loss-curve")  # fmt: skip
    panel.previews = gr.Gallery(label="Previews (every N steps, from step 0)", columns=3, height=380,
                                object_fit="contain", elem_id=f"{prefix}previews")  # fmt: skip


@dataclass
class PresetsRow:
    chosen: gr.Dropdown
    name: gr.Textbox
    save: gr.Button
    load: gr.Button
    delete: gr.Button


def presets_row(studio: Studio, kind: str, prefix: str) -> PresetsRow:
    """Save and load the form as a named preset."""
    with gr.Accordion("Presets", open=False, elem_id=f"{prefix}presets"):
        with gr.Row():
            chosen = gr.Dropdown(studio.presets.names(kind), value=None, label="Saved presets",
                                 elem_id=f"{prefix}preset-list")  # fmt: skip
            load = gr.Button("Load", size="sm", elem_id=f"{prefix}preset-load")
            delete = gr.Button("Delete", size="sm", elem_id=f"{prefix}preset-delete")
        with gr.Row():
            name = gr.Textbox(label="Preset name", placeholder="e.g. fast-star", elem_id=f"{prefix}preset-name")
            save = gr.Button("Save the form as a preset", size="sm", elem_id=f"{prefix}preset-save")
    return PresetsRow(chosen, name, save, load, delete)


def wire_job_form(
    studio: Studio,
    demo: gr.Blocks,
    panel: JobPanel,
    presets: PresetsRow,
    kind: str,
    inputs: set,
    form_outputs: list,
    spec_from,
    fill,
    preset_spec=None,
    loaded_note=lambda spec: "",
) -> None:
    """What the Train and Control forms share: Start and Estimate read the form (``spec_from(values)``), presets save
    it (``preset_spec``, default ``spec_from``) and fill it back (``fill(spec, job_state, with_name)``), and after a
    reload the form shows the running (or last) job of its ``kind``."""
    preset_spec = preset_spec or spec_from

    def fill_from_job():
        """After a reload: the running (or last) job's settings, not the defaults."""
        state = studio.jobs.status()
        if not state or state["kind"] != kind:
            return [gr.skip()] * len(form_outputs)
        return fill(studio.jobs.spec(), state, True)

    @inline_errors(note=0, outputs=1)
    def start(values: dict):
        studio.jobs.start(spec_from(values))
        return ""  # the estimate stays, to compare with the job

    @inline_errors(note=0, outputs=2)
    def estimate(values: dict):
        return "", studio.jobs.estimate(spec_from(values)).markdown()

    @inline_errors(note=0, outputs=3)
    def save_preset(values: dict):
        preset, replaced = studio.presets.save(values[presets.name], preset_spec(values))
        listing = studio.presets.listing(kind)  # a bad file is named in the note, never in the way
        said = f"preset '{preset.name}' {'replaced' if replaced else 'saved'}{listing.note()}"
        return said, gr.update(choices=listing.names, value=preset.name), ""

    @inline_errors(note=0, outputs=1 + len(form_outputs))
    def load_preset(name):
        if not name:
            raise StudioError("choose a saved preset to load")
        preset = studio.presets.load(name)
        if preset.kind != kind:
            raise StudioError(f"preset '{name}' is for {preset.kind} training, not this form")
        spec = preset.spec()
        return f"loaded preset '{name}'{loaded_note(spec)}", *fill(spec, None, False)

    @inline_errors(note=0, outputs=2)
    def delete_preset(name):
        if not name:
            raise StudioError("choose a saved preset to delete")
        studio.presets.delete(name)
        listing = studio.presets.listing(kind)
        return f"preset '{name}' deleted{listing.note()}", gr.update(choices=listing.names, value=None)

    demo.load(fill_from_job, None, form_outputs)
    panel.start.click(start, inputs, panel.note)
    panel.estimate.click(estimate, inputs, [panel.note, panel.estimate_text])
    presets.save.click(save_preset, inputs | {presets.name}, [panel.note, presets.chosen, panel.estimate_text])
    presets.load.click(load_preset, presets.chosen, [panel.note, *form_outputs])
    presets.delete.click(delete_preset, presets.chosen, [panel.note, presets.chosen])


def wire_jobs(studio: Studio, demo: gr.Blocks, panels: list[JobPanel]) -> None:
    """One timer polls the job for every tab's view; Stop and Resume from any tab act on the one job."""
    seen = gr.State({})
    timer = gr.Timer(1.0)

    def poll(last: dict):
        state = studio.jobs.status()
        found = [(p["path"], p["caption"]) for p in state.get("previews", [])]
        losses = state.get("losses", [])
        now = {"id": state.get("id"), "previews": len(found), "losses": len(losses)}
        running = bool(state.get("running"))
        busy = running or studio.queue.running()  # one training at a time: a queue run blocks Start too
        new_previews = found if (now["id"], now["previews"]) != (last.get("id"), last.get("previews")) else gr.skip()
        new_losses = loss_frame(losses) if (now["id"], now["losses"]) != (last.get("id"), last.get("losses")) else (
            gr.skip())  # fmt: skip
        values = [now]
        for _ in panels:
            values += [format_status(state), new_losses, new_previews, gr.update(interactive=not busy),
                       gr.update(interactive=running), gr.update(interactive=bool(state.get("resumable")) and not busy),
                       gr.update(interactive=not busy)]  # fmt: skip
        return tuple(values)

    outputs = [seen]
    for panel in panels:
        outputs += [panel.status, panel.loss, panel.previews, panel.start, panel.stop, panel.resume, panel.estimate]
    timer.tick(poll, seen, outputs, show_progress="hidden")
    demo.load(poll, gr.State({}), outputs, show_progress="hidden")

    for panel in panels:

        @inline_errors(note=0, outputs=1)
        def stop():
            studio.jobs.stop()
            return ""

        @inline_errors(note=0, outputs=1)
        def resume():
            studio.jobs.resume()
            return ""

        panel.stop.click(stop, None, panel.note).then(poll, gr.State({}), outputs)
        panel.resume.click(resume, None, panel.note).then(poll, gr.State({}), outputs)


def spec_updates(spec, form: dict, with_name: bool) -> list:
    """The form's values for ``spec`` (a job's or a preset's), in ``form``'s order; the name only if asked."""
    values = []
    for key in form:
        if key == "adapter_name" and not with_name:
            values.append(gr.skip())
        elif key == "method":
            values.append(METHOD_LABELS[spec.method])
        elif key == "source":
            values.append(SOURCE_LABELS[spec.source])
        else:
            values.append(getattr(spec, key))
    return values


def whole_number(defaults: FormSpec, key: str, label: str, **kwargs) -> gr.Number:
    """A number box for a whole-number setting: the form's default, and the least value Start accepts
    (``FormSpec.ranges``)."""
    return gr.Number(getattr(defaults, key), precision=0, minimum=defaults.ranges()[key][0], label=label, **kwargs)


def seed_box(defaults: FormSpec) -> gr.Number:
    return gr.Number(defaults.seed, precision=0, minimum=0, label="Seed")


def learning_rate_box(defaults: FormSpec, key: str = "learning_rate", **kwargs) -> gr.Number:
    """A learning-rate box labelled with the paper's value for this form (``FormSpec.LEARNING_RATES``)."""
    label = f"{key.replace('_', ' ').capitalize()} (paper: {short_rate(defaults.LEARNING_RATES[key])})"
    return gr.Number(getattr(defaults, key), label=label, **kwargs)


def method_row(form: dict, defaults: FormSpec, prefix: str, studio: Studio, config_class) -> None:
    """The method and its number of blocks, into ``form``; beside them, whether Blocks divides every width the job's
    adapter would cover on this model (``config_class``'s default targets), checked as either changes."""
    with gr.Row():
        form["method"] = gr.Radio(METHOD_CHOICES, value=METHOD_LABELS[defaults.method], label="Method",
                                  elem_id=f"{prefix}method")  # fmt: skip
        form["n_blocks"] = whole_number(defaults, "n_blocks", "Blocks", elem_id=f"{prefix}n-blocks")
        form["base_quantization"] = gr.Dropdown(
            ["none", "int8", "nf4"], value=defaults.base_quantization, label="Base model weights",
            info="int8 halves the frozen model's memory, nf4 quarters it; the adapter still trains in float32",
            elem_id=f"{prefix}base-quantization",
        )  # fmt: skip
    note = gr.Markdown("", elem_id=f"{prefix}blocks-note")
    targets = adapter_targets(config_class.__dataclass_fields__["target_modules"].default)  # the job's default

    def check(method, n_blocks):
        if n_blocks is None:
            return ""
        try:
            config = EtherConfig(target_modules=targets, method=METHODS.get(method, method), n_blocks=int(n_blocks))
            studio.sampler.check_adapter_config(config)
        except Exception as err:  # noqa: BLE001  (every reason reaches the page, beside the field)
            return error_note(err)
        return ""

    for component in (form["method"], form["n_blocks"]):
        component.change(check, [form["method"], form["n_blocks"]], note)


def sampling_row(seeds: str, seeds_id: str, steps_id: str) -> tuple[gr.Textbox, gr.Slider, gr.Slider]:
    """The seeds, steps and guidance controls every sampling form shows, in one row."""
    with gr.Row():
        seed_list = gr.Textbox(seeds, label="Seeds (e.g. 0, 1, 5-7)", elem_id=seeds_id)
        steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id=steps_id)
        guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
    return seed_list, steps, guidance


def previews_accordion(form: dict, defaults: FormSpec, prefix: str, empty_prompt: str) -> None:
    """How often to sample previews, how many, with how many steps, the prompt (empty: ``empty_prompt``) and the
    guidance, into ``form``."""
    with gr.Accordion("Previews", open=False, elem_id=f"{prefix}preview-settings"):
        with gr.Row():
            form["preview_every"] = whole_number(defaults, "preview_every", "Preview every N steps",
                                                 elem_id=f"{prefix}preview-every")  # fmt: skip
            form["preview_images"] = whole_number(defaults, "preview_images", "Images per preview")
            form["preview_steps"] = whole_number(defaults, "preview_steps", "Sampling steps",
                                                 elem_id=f"{prefix}preview-steps")  # fmt: skip
        with gr.Row():
            form["preview_prompt"] = gr.Textbox(
                defaults.preview_prompt, label=f"Preview prompt (empty: {empty_prompt})"
            )
            form["guidance_scale"] = gr.Number(defaults.guidance_scale, minimum=0, label="Guidance")


def read_form(values: dict, form: dict) -> dict:
    """The form's values keyed by spec field: an empty text is "", an empty seed 0, an empty number refused."""
    fields_ = {}
    for key, component in form.items():
        value = values[component]
        if key == "seed":
            value = int(value or 0)
        elif isinstance(component, gr.Textbox):
            value = value or ""
        elif isinstance(component, gr.Number) and value is None:
            raise StudioError(f"{key.replace('_', ' ')} is empty: give a number")
        fields_[key] = value
    return fields_


def train_tab(studio: Studio, demo: gr.Blocks, first_subject: str | None) -> JobPanel:
    """The Train tab: the DreamBooth form keyed by ``TrainSpec`` field, presets, estimate, and the job's view."""
    name, instance_prompt, class_prompt, images = studio.subject_fields(first_subject)
    with gr.Row():
        with gr.Column(scale=1):
            shipped = bool(studio.subjects)  # an installed wheel ships no subjects: the form starts on uploads
            source = gr.Radio([SHIPPED, UPLOAD], value=SHIPPED if shipped else UPLOAD, label="Images",
                              elem_id="image-source")  # fmt: skip
            subject = gr.Dropdown(list(studio.subjects), value=first_subject, label="Shipped subject",
                                  visible=shipped)  # fmt: skip
            uploads = gr.File(file_count="multiple", file_types=["image"], label="Upload 3-10 images",
                              visible=not shipped, elem_id="uploads")  # fmt: skip
            instance = gr.Gallery(images, label="Instance images", columns=5, height=140, elem_id="instance-images")
            form = {"adapter_name": gr.Textbox(name, label="Adapter name", elem_id="adapter-name")}
            with gr.Row():
                form["instance_prompt"] = gr.Textbox(
                    instance_prompt, label="Instance prompt (with identifier)", elem_id="instance-prompt"
                )
                form["class_prompt"] = gr.Textbox(class_prompt, label="Class prompt", elem_id="class-prompt")
            defaults = TrainSpec(adapter_name="", instance_prompt="")
            method_row(form, defaults, "", studio, DreamBoothConfig)
            with gr.Row():
                form["max_train_steps"] = whole_number(defaults, "max_train_steps", "Steps", elem_id="train-steps")
                form["learning_rate"] = learning_rate_box(defaults, elem_id="learning-rate")
                form["seed"] = seed_box(defaults)
            with gr.Row():
                form["prior_preservation"] = gr.Checkbox(defaults.prior_preservation, label="Prior preservation")
                form["num_class_images"] = whole_number(defaults, "num_class_images", "Class images",
                                                        elem_id="class-images")  # fmt: skip
            previews_accordion(form, defaults, "", "the instance prompt")
            presets = presets_row(studio, TrainSpec.kind, "")
            panel = job_buttons("")
            queue_add = gr.Button("Add to queue (jobs in the queue train side by side)", elem_id="queue-add")
        with gr.Column(scale=1):
            job_view(panel, studio, "train-")
            queue = queue_view(studio, queue_add)

    def spec_from(values: dict, need_subject: bool = True) -> TrainSpec:
        chosen_source = values[source]
        if need_subject and chosen_source == SHIPPED and not values[subject]:
            raise StudioError("pick a shipped subject, or switch to 'My images' and upload 3-10 images")
        fields_ = read_form(values, form)
        fields_.update(
            prior_preservation=bool(fields_["prior_preservation"]),
            subject=values[subject] if chosen_source == SHIPPED else None,
            uploads=[str(u) for u in (values[uploads] or [])] if chosen_source == UPLOAD else [],
        )
        return TrainSpec(**fields_)

    form_outputs = [*form.values(), source, subject, instance]

    def fill(spec: TrainSpec, instance_dir: str | None, with_name: bool) -> list:
        shipped = spec.subject is not None
        folder = studio.subjects[spec.subject]["folder"] if shipped and spec.subject in studio.subjects else (
            instance_dir)  # fmt: skip
        return [*spec_updates(spec, form, with_name), SHIPPED if shipped else UPLOAD,
                spec.subject if shipped else gr.skip(), studio.images(folder) if folder else gr.skip()]  # fmt: skip

    def shown_images(chosen_source, chosen_subject, files):
        """The instance gallery shows what the job would train on: the shipped subject's images, or the uploads."""
        if chosen_source == UPLOAD:
            return [str(getattr(f, "name", f)) for f in files or []]
        return studio.subject_fields(chosen_subject)[3] if chosen_subject else []

    source.change(lambda s, subj, files: (gr.update(visible=s == SHIPPED), gr.update(visible=s == UPLOAD),
                                          shown_images(s, subj, files)),
                  [source, subject, uploads], [subject, uploads, instance])  # fmt: skip
    uploads.change(shown_images, [source, subject, uploads], instance)
    subject.input(studio.subject_fields, subject, [form["adapter_name"], form["instance_prompt"],
                                                   form["class_prompt"], instance])  # fmt: skip
    inputs = {source, subject, uploads, *form.values()}  # a set: handlers receive {component: value}
    wire_job_form(studio, demo, panel, presets, TrainSpec.kind, inputs, form_outputs, spec_from,
                  lambda spec, state, with_name: fill(spec, (state or {}).get("instance_dir"), with_name),
                  preset_spec=lambda values: spec_from(values, need_subject=False),
                  loaded_note=lambda spec: "; upload your images" if spec.subject is None else "")  # fmt: skip
    wire_queue(studio, queue, inputs, spec_from)
    return panel


@dataclass
class QueuePanel:
    """The Train tab's queue: jobs added with the form's settings, trained side by side, one row of progress each."""

    add: gr.Button
    status: gr.Markdown
    table: gr.Dataframe
    train: gr.Button
    stop: gr.Button
    chosen: gr.Dropdown
    remove: gr.Button
    note: gr.Markdown


def queue_view(studio: Studio, add: gr.Button) -> QueuePanel:
    with gr.Accordion("Queue: jobs trained side by side", open=True, elem_id="queue"):
        status = gr.Markdown(studio.queue.summary(), elem_id="queue-status")
        table = gr.Dataframe(queue_frame(studio.queue.rows()), headers=QUEUE_HEADERS, interactive=False,
                             elem_id="queue-table")  # fmt: skip
        with gr.Row():
            train = gr.Button("Train queue", variant="primary", elem_id="queue-train")
            stop = gr.Button("Stop queue", variant="stop", interactive=False, elem_id="queue-stop")
        with gr.Row():
            chosen = gr.Dropdown(studio.queue.removable(), value=None, label="Job", elem_id="queue-job")
            remove = gr.Button("Remove from the list", size="sm", elem_id="queue-remove")
        note = gr.Markdown("", elem_id="queue-note")
    return QueuePanel(add, status, table, train, stop, chosen, remove, note)


def queue_frame(rows: list[list]) -> pd.DataFrame:
    return pd.DataFrame(rows or [[""] * len(QUEUE_HEADERS)], columns=QUEUE_HEADERS)


def wire_queue(studio: Studio, panel: QueuePanel, inputs: set, spec_from) -> None:
    """Add (the Train form's settings), Train queue, Stop queue, Remove; a timer shows each job's row."""
    queue = studio.queue

    def view(last: dict, chosen=None):
        rows, removable, running = queue.rows(), queue.removable(), queue.running()
        now = {"rows": rows, "removable": removable}
        table = queue_frame(rows) if rows != last.get("rows") else gr.skip()
        choices = gr.update(choices=removable, value=chosen if chosen in removable else None) if (
            removable != last.get("removable")) else gr.skip()  # fmt: skip
        idle = not running and not studio.jobs.running()
        return (now, queue.summary(), table, gr.update(interactive=idle), gr.update(interactive=running), choices)

    seen = gr.State({})
    outputs = [seen, panel.status, panel.table, panel.train, panel.stop, panel.chosen]

    @inline_errors(note=0, outputs=1)
    def add(values: dict):
        state = queue.add(spec_from(values))
        return f"queued '{state['spec']['adapter_name']}': press **Train queue** when every job is in"

    @inline_errors(note=0, outputs=1)
    def train():
        return queue.start()

    @inline_errors(note=0, outputs=1)
    def stop():
        return queue.stop()

    @inline_errors(note=0, outputs=1)
    def remove(job_id):
        if not job_id:
            raise StudioError("choose a job from the list to remove")
        return queue.remove(job_id)

    refresh = {"fn": view, "inputs": [seen, panel.chosen], "outputs": outputs, "show_progress": "hidden"}
    gr.Timer(1.0).tick(**refresh)
    panel.add.click(add, inputs, panel.note).then(lambda: {}, None, seen).then(**refresh)
    panel.train.click(train, None, panel.note).then(**refresh)
    panel.stop.click(stop, None, panel.note).then(**refresh)
    panel.remove.click(remove, panel.chosen, panel.note).then(lambda: {}, None, seen).then(**refresh)


def control_tab(studio: Studio, demo: gr.Blocks, tab: gr.Tab) -> JobPanel:
    """The Control tab: train a control adapter (world sets or a dataset folder) and sample with a control map
    uploaded or drawn on a canvas, beside the same prompt without control."""
    defaults = ControlSpec(adapter_name="")
    with gr.Tabs():
        with gr.Tab("Train a control adapter", id="control-train"):
            with gr.Row():
                with gr.Column(scale=1):
                    form = {"adapter_name": gr.Textbox(studio.store.free_name("shapes"), label="Adapter name",
                                                       elem_id="control-name")}  # fmt: skip
                    form["source"] = gr.Radio(list(SOURCE_LABELS.values()), value=SOURCE_LABELS[defaults.source],
                                              label="Training data", elem_id="control-source")  # fmt: skip
                    with gr.Row():
                        form["scenes"] = whole_number(defaults, "scenes", "World scenes (rendered once)",
                                                      elem_id="control-scenes")  # fmt: skip
                        form["data_dir"] = gr.Textbox("", label="Dataset folder on the studio's machine",
                                                      placeholder="a folder with metadata.jsonl", visible=False,
                                                      elem_id="control-folder")  # fmt: skip
                    method_row(form, defaults, "control-", studio, ControlConfig)
                    with gr.Row():
                        form["max_train_steps"] = whole_number(defaults, "max_train_steps", "Steps",
                                                               elem_id="control-steps")  # fmt: skip
                        form["train_batch_size"] = whole_number(defaults, "train_batch_size", "Batch size",
                                                                elem_id="control-batch")  # fmt: skip
                        form["seed"] = seed_box(defaults)
                    with gr.Row():
                        form["learning_rate"] = learning_rate_box(defaults)
                        form["encoder_learning_rate"] = learning_rate_box(defaults, "encoder_learning_rate")
                    previews_accordion(form, defaults, "control-", "the held-out control's caption")
                    presets = presets_row(studio, ControlSpec.kind, "control-")
                    panel = job_buttons("control-")
                with gr.Column(scale=1):
                    job_view(panel, studio, "control-")
        with gr.Tab("Sample with a control map", id="control-sample") as sample_tab_:
            with gr.Row():
                with gr.Column(scale=1):
                    with gr.Row():
                        adapter = gr.Dropdown(studio.adapter_choices(TaskKind.CONTROL), label="Control adapter",
                                              elem_id="control-adapter")  # fmt: skip
                        refresh_btn = gr.Button("Refresh", size="sm")
                    canvas = gr.ImageEditor(
                        value=_blank_canvas(), type="pil", image_mode="RGBA", format="png",
                        canvas_size=(CANVAS, CANVAS), fixed_canvas=True, sources=("upload", "clipboard"),
                        brush=gr.Brush(colors=palette_colors("segmentation") + palette_colors("edges"),
                                       default_color=palette_colors("segmentation")[0], color_mode="fixed",
                                       default_size=14),
                        label="Control map: draw (class colours, or white edges on black) or upload",
                        height=360, elem_id="control-canvas",
                    )  # fmt: skip
                    with gr.Row():
                        example_seg = gr.Button("Example segmentation map", size="sm", elem_id="example-seg")
                        example_edges = gr.Button("Example edge map", size="sm", elem_id="example-edges")
                        clear_btn = gr.Button("Blank canvas", size="sm")
                    prompt = gr.Textbox("", label="Prompt", elem_id="control-prompt")
                    seeds, steps, guidance = sampling_row("0", "control-seeds", "control-sample-steps")
                    compare = gr.Checkbox(True, label="Also the same prompt without control (side by side)")
                    generate_btn = gr.Button("Generate", variant="primary", elem_id="control-generate")
                with gr.Column(scale=1):
                    samples = gr.Gallery(label="Control map | with control | without control", columns=3,
                                         height=420, elem_id="control-samples")  # fmt: skip
                    sample_note = gr.Markdown("", elem_id="control-sample-note")

    def spec_from(values: dict) -> ControlSpec:
        fields_ = read_form(values, form)
        labels = {label: source for source, label in SOURCE_LABELS.items()}
        fields_["source"] = labels.get(fields_["source"], fields_["source"])
        return ControlSpec(**fields_)

    form_outputs = list(form.values())

    def fill(spec: ControlSpec, with_name: bool) -> list:
        values = dict(zip(form, spec_updates(spec, form, with_name)))
        folder = spec.source == "folder"  # the source's own field shows, the other hides
        values["scenes"] = gr.update(value=spec.scenes, visible=not folder)
        values["data_dir"] = gr.update(value=spec.data_dir, visible=folder)
        return list(values.values())

    def example(task: str):
        image, caption = example_control(task)
        return image.resize((CANVAS, CANVAS), 0), caption  # nearest: the map's colours stay exact

    @inline_errors(note=1, outputs=2)
    def generate(adapter_value, canvas_value, prompt_value, seeds_value, steps_value, guidance_value, compare_value):
        if not adapter_value:
            raise StudioError("choose a control adapter (train one first, or press Refresh)")
        drawn = (canvas_value or {}).get("composite") if isinstance(canvas_value, dict) else canvas_value
        request = ControlRequest(adapter_value, drawn, prompt_value or "", seeds=parse_seeds(seeds_value),
                                 steps=int(steps_value), guidance_scale=float(guidance_value),
                                 compare=bool(compare_value))  # fmt: skip
        result = studio.sampler.sample_control(request)
        gallery = [(str(p), c) for p, c in zip(result.paths, result.captions)]
        fitted = f"; the map was {result.note}" if result.note else ""
        return gallery, f"{len(result.images) - 1} images in {result.seconds:.1f} s{fitted}, saved in " \
            f"`{result.paths[0].parent}`"  # fmt: skip

    def refresh(current):
        choices = studio.adapter_choices(TaskKind.CONTROL)
        return gr.update(choices=choices, value=current if current in choices else next(iter(choices), None))

    form["source"].change(lambda s: (gr.update(visible=s != SOURCE_LABELS["folder"]),
                                     gr.update(visible=s == SOURCE_LABELS["folder"])), form["source"],
                          [form["scenes"], form["data_dir"]])  # fmt: skip
    wire_job_form(studio, demo, panel, presets, ControlSpec.kind, set(form.values()), form_outputs, spec_from,
                  lambda spec, state, with_name: fill(spec, with_name))  # fmt: skip
    example_seg.click(lambda: example("segmentation"), None, [canvas, prompt])
    example_edges.click(lambda: example("edges"), None, [canvas, prompt])
    clear_btn.click(_blank_canvas, None, canvas)
    for trigger in (tab.select, sample_tab_.select, refresh_btn.click, demo.load):
        trigger(refresh, adapter, adapter)
    generate_btn.click(generate, [adapter, canvas, prompt, seeds, steps, guidance, compare], [samples, sample_note],
                       concurrency_limit=8)  # fmt: skip
    return panel


def _blank_canvas():
    from PIL import Image

    return Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 255))


def sample_tab(studio: Studio, demo: gr.Blocks, tab: gr.Tab, prompt_text: str) -> None:
    """The Sample tab: up to three adapters with strengths, seeds, each image beside the base model's."""
    with gr.Row():
        with gr.Column(scale=1):
            slots = []
            for i in range(ADAPTER_SLOTS):
                with gr.Row():
                    slots.append(gr.Dropdown(studio.adapter_choices(), value=NO_ADAPTER, label=f"Adapter {i + 1}",
                                             elem_id=f"adapter-slot-{i}"))  # fmt: skip
                    slots.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="Strength"))
            refresh_btn = gr.Button("Refresh adapter list", size="sm")
            prompt = gr.Textbox(prompt_text, label="Prompt", elem_id="sample-prompt")
            negative = gr.Textbox("", label="Negative prompt")
            seeds, steps, guidance = sampling_row("0, 1", "seeds", "sample-steps")
            compare = gr.Checkbox(True, label="Also the base model, same seed (side by side)")
            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=1):
            samples = gr.Gallery(label="Samples (adapter | base model)", columns=2, height=420, elem_id="samples")
            note = gr.Markdown("", elem_id="sample-note")
            downloads = gr.File(label="Download", file_count="multiple", interactive=False)

    @inline_errors(note=2, outputs=3)
    def sample(
        prompt_value,
        negative_value,
        seeds_value,
        steps_value,
        guidance_value,
        compare_value,
        progress=gr.Progress(),  # noqa: B008  (gradio's progress parameter, before the slots)
        *slot_values,
    ):
        adapters = [(n, float(w)) for n, w in zip(slot_values[::2], slot_values[1::2]) if n and n != NO_ADAPTER]
        request = SampleRequest(prompt=prompt_value or "", adapters=adapters, negative_prompt=negative_value or "",
                                seeds=parse_seeds(seeds_value), steps=int(steps_value),
                                guidance_scale=float(guidance_value), compare=bool(compare_value))  # fmt: skip
        result = studio.sampler.sample(
            request, on_step=lambda done, total: progress(done / total, desc=f"denoising step {done}/{total}")
        )
        gallery = [(str(p), c) for p, c in zip(result.paths, result.captions)]
        message = f"{len(result.images)} images in {result.seconds:.1f} s, saved in `{result.paths[0].parent}`"
        return gallery, [str(p) for p in result.paths], message

    def refresh(*current):
        choices = studio.adapter_choices()
        return [gr.update(choices=choices, value=c if c in choices else NO_ADAPTER) for c in current]

    dropdowns = slots[::2]
    for trigger in (tab.select, refresh_btn.click, demo.load):
        trigger(refresh, dropdowns, dropdowns)
    generate_btn.click(
        sample,
        [prompt, negative, seeds, steps, guidance, compare, *slots],
        [samples, downloads, note],
        concurrency_limit=8,
    )  # fmt: skip  (clients queue on the lock)


def adapters_tab(studio: Studio, demo: gr.Blocks, tab: gr.Tab) -> None:
    """The Adapters tab: the saved adapters with thumbnails; rename, delete, import (strict), export."""
    store = studio.store
    table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, label="Saved adapters", elem_id="adapter-table")
    thumbs = gr.Gallery(label="Thumbnails", columns=8, height=180, allow_preview=False, fit_columns=False)
    with gr.Row():
        selected = gr.Dropdown([], label="Adapter", elem_id="selected-adapter")
        new_name = gr.Textbox(label="New name", elem_id="new-name")
        rename_btn = gr.Button("Rename", elem_id="rename")
        delete_btn = gr.Button("Delete", variant="stop", elem_id="delete")
        export_btn = gr.DownloadButton("Export (download)", elem_id="export")
    with gr.Row():
        import_file = gr.File(label="Import an adapter (.safetensors)", file_types=[".safetensors"],
                              elem_id="import-file")  # fmt: skip
        import_name = gr.Textbox(label="Name (empty: from the file name)")
        import_btn = gr.Button("Import", elem_id="import")
    with gr.Row():
        lora_format = gr.Radio(["kohya", "diffusers"], value="kohya", label="LoRA format", elem_id="lora-format",
                               info="kohya: ComfyUI, A1111, Forge · diffusers: pipe.load_lora_weights")  # fmt: skip
        lora_btn = gr.Button("Export as LoRA", elem_id="export-lora")
        lora_file = gr.File(label="LoRA file (exact, fp32)", interactive=False, elem_id="lora-file")
    note = gr.Markdown("", elem_id="adapters-note")

    def view(chosen=None):
        infos = store.list()
        names = [i.name for i in infos]
        rows = [i.row() for i in infos] or [[""] * len(TABLE_HEADERS)]
        thumbnails = [(str(i.thumbnail), i.name) for i in infos if i.thumbnail is not None]
        return rows, thumbnails, gr.update(choices=names, value=chosen if chosen in names else next(iter(names), None))

    @inline_errors(note=3, outputs=4)
    def rename(old, new):
        if not old:
            raise StudioError("select an adapter to rename")
        name = store.rename(old, new)
        return (*view(name), f"renamed '{old}' to '{name}'")

    @inline_errors(note=3, outputs=4)
    def delete(name):
        if not name:
            raise StudioError("select an adapter to delete")
        store.delete(name)
        return (*view(), f"deleted '{name}'")

    @inline_errors(note=3, outputs=5)
    def import_adapter(upload, name):
        imported = store.import_file(upload, name, check_fits=studio.sampler.check_fits)
        info = store.info(imported)
        if info.task is not TaskKind.CONTROL:  # a control adapter needs a map to show anything; no thumbnail for it
            try:
                store.set_thumbnail(imported, studio.sampler.thumbnail(imported, steps=10))
            except StudioError:
                pass  # a thumbnail is a nicety; the import itself succeeded
        return (*view(imported), f"imported '{imported}' ({info.task}, {info.method}, {info.parameters:,} "
                "parameters)", None)  # fmt: skip

    @inline_errors(note=1, outputs=2)
    def export(name):
        """The file behind the Export button, following the selected adapter."""
        return gr.update(value=str(store.export(name)) if name else None, interactive=bool(name)), gr.skip()

    @inline_errors(note=1, outputs=2)
    def export_lora(name, format):
        if not name:
            raise StudioError("select an adapter to export")
        path, summary = store.export_lora(name, format, studio.model, studio.sampler.model_config)
        where = "ComfyUI: models/loras; A1111 and Forge: models/Lora" if format == "kohya" else (
            "pipe.load_lora_weights(file)")  # fmt: skip
        return str(path), (f"{format} LoRA of '{name}' ({summary.dtype}, {sum(summary.layers.values())} layers, "
                           f"{summary.bytes / 1e6:.2f} MB) ready to download: {where}")  # fmt: skip

    outputs = [table, thumbs, selected]
    tab.select(view, selected, outputs)
    demo.load(view, None, outputs)
    rename_btn.click(rename, [selected, new_name], [*outputs, note])
    delete_btn.click(delete, selected, [*outputs, note])
    selected.change(export, selected, [export_btn, note])
    import_btn.click(import_adapter, [import_file, import_name], [*outputs, note, import_file])
    lora_btn.click(export_lora, [selected, lora_format], [lora_file, note])


CSS = """
.studio-error { color: var(--error-text-color, #b91c1c); background: var(--error-background-fill, #fef2f2);
                border: 1px solid var(--error-border-color, #fca5a5); border-radius: 6px; padding: 6px 10px; }
"""


def build_app(
    model: str | Path | None = None, workdir: str | Path = "outputs/studio", model_config: str | None = None
) -> gr.Blocks:
    studio = Studio.open(model, workdir, model_config)
    first = DEFAULT_SUBJECT if DEFAULT_SUBJECT in studio.subjects else next(iter(studio.subjects), None)
    prompt = studio.subject_fields(first)[1]
    with gr.Blocks(title="ETHER Studio", analytics_enabled=False) as demo:
        gr.Markdown(
            "# ETHER Studio\nPersonalize Stable Diffusion with ETHER adapters (hyperplane reflections). "
            f"Base model: `{studio.model}` · workspace: `{studio.workspace.root}`"
        )
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                train_panel = train_tab(studio, demo, first)
            with gr.Tab("Control", id="control") as tab:
                control_panel = control_tab(studio, demo, tab)
            with gr.Tab("Sample", id="sample") as tab:
                sample_tab(studio, demo, tab, f"{prompt} on a blue background" if prompt else "")
            with gr.Tab("Adapters", id="adapters") as tab:
                adapters_tab(studio, demo, tab)
        wire_jobs(studio, demo, [train_panel, control_panel])
    demo.studio = {"workspace": studio.workspace, "jobs": studio.jobs, "queue": studio.queue,
                   "sampler": studio.sampler, "store": studio.store, "presets": studio.presets}  # fmt: skip
    return demo


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="ETHER Studio: train, sample and manage ETHER adapters")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (0.0.0.0: every interface; beyond the loopback it needs --auth or --auth_file)",
    )  # fmt: skip
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--auth", action="append", default=[], metavar="USER:PASSWORD",
        help="ask for a login with this account (repeat for several); visible to other users of this machine in its "
        "process list: prefer --auth_file",
    )  # fmt: skip
    parser.add_argument(
        "--auth_file", default=None, metavar="FILE", help="accounts to log in with, USER:PASSWORD a line"
    )
    parser.add_argument(
        "--insecure_no_auth", action="store_true",
        help="listen beyond the loopback without a login: anyone reaching the port can train, delete and export",
    )  # fmt: skip
    parser.add_argument(
        "--model", default=None,
        help="diffusers folder, hub id or single checkpoint file (default: a checkout's tiny model, assets/tiny-sd)",
    )  # fmt: skip
    parser.add_argument(
        "--config", default=None, help="for a single-file --model: a local diffusers folder of its architecture"
    )
    parser.add_argument("--workdir", default="outputs/studio", help="folder for adapters, jobs and samples")


def launch(args: argparse.Namespace, block: bool = True) -> gr.Blocks:
    """Serve the studio as ``args`` say; StudioError before anything starts for bad accounts, or for a host beyond the
    loopback without a login (``access.py``)."""
    logins = accounts(getattr(args, "auth", None), getattr(args, "auth_file", None))
    warning = check_exposure(args.host, args.port, logins, getattr(args, "insecure_no_auth", False))
    if warning:
        print(warning, file=sys.stderr)
    demo = build_app(args.model, args.workdir, args.config)
    for line in demo.studio["jobs"].skipped + demo.studio["queue"].skipped:
        print(f"note: {line}", file=sys.stderr)
    workspace = demo.studio["workspace"]
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        auth=logins or None,
        auth_message="ETHER Studio: log in with an account the studio was started with (--auth, --auth_file)",
        allowed_paths=[str(workspace.root), str(default_subjects_path())],
        max_file_size="60mb",
        show_error=True,
        ssr_mode=False,
        prevent_thread_lock=not block,
        theme=gr.themes.Soft(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"]),
        css=CSS,
        footer_links=[],
    )
    return demo


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        args.model = str(args.model or shipped_model())
        launch(args)  # refuses bad accounts, and a host beyond the loopback without a login, before building the page
    except StudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
