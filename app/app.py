"""ETHER Studio: train, sample and manage ETHER adapters in the browser.

    python app/app.py [--host 127.0.0.1] [--port 7860] [--model assets/tiny-sd] [--workdir outputs/studio]

or ``ether-diffusion studio`` with the same flags. This file only lays out widgets and wires events; the work
(training jobs, adapters, sampling) is in ``ether_diffusion.studio``, tested without a browser.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the studio works offline

import gradio as gr  # noqa: E402

from ether_diffusion.config import METHOD_LABELS  # noqa: E402
from ether_diffusion.demo import DEFAULT_SUBJECT  # noqa: E402
from ether_diffusion.studio import (  # noqa: E402
    AdapterStore,
    JobManager,
    Sampler,
    SampleRequest,
    StudioError,
    TrainSpec,
    Workspace,
)
from ether_diffusion.studio.adapters import TABLE_HEADERS  # noqa: E402
from ether_diffusion.studio.jobs import shipped_subjects  # noqa: E402
from ether_diffusion.studio.sampling import parse_seeds  # noqa: E402
from ether_diffusion.training.config import ETHER_METHODS  # noqa: E402
from ether_diffusion.training.dreambooth import PAPER_LEARNING_RATE  # noqa: E402

SHIPPED, UPLOAD = "Shipped subject", "My images"
NO_ADAPTER = "(none)"
ADAPTER_SLOTS = 3
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: nothing is fetched from outside


def page_errors(fn):
    """Show every failure on the page: our messages as they are, anything else with its type."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (StudioError, ValueError, KeyError, FileNotFoundError, PermissionError) as err:
            raise gr.Error(str(err).strip("'\""), duration=None) from err
        except Exception as err:
            traceback.print_exc()
            raise gr.Error(f"{type(err).__name__}: {err}", duration=None) from err

    return wrapper


def format_status(state: dict) -> str:
    if not state:
        return "No training job yet. Pick a subject or upload images, then **Start**."
    spec = state["spec"]
    method = METHOD_LABELS[spec["method"]]
    lines = [f"**{spec['adapter_name']}** · {method} · job `{state['id']}`", f"**{state['phase']}**"]
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
    return "\n\n".join(lines)


@dataclass
class Studio:
    """The studio's work (``ether_diffusion.studio``) for one model and workspace, shared by every page."""

    model: str
    workspace: Workspace
    store: AdapterStore
    jobs: JobManager
    sampler: Sampler
    subjects: dict

    @classmethod
    def open(cls, model: str | Path | None, workdir: str | Path, model_config: str | None = None) -> Studio:
        from ether_diffusion.models import default_model

        model = str(model or default_model())
        workspace = Workspace(workdir)
        store = AdapterStore(workspace)
        jobs = JobManager(workspace, model, store, model_config)
        return cls(model, workspace, store, jobs, Sampler(model, workspace, store, model_config), shipped_subjects())

    def subject_fields(self, name):
        """Adapter name, instance prompt, class prompt and images of shipped subject ``name``."""
        record = self.subjects.get(name)
        if record is None:
            return "", "", "", []
        images = [(str(p), p.name) for p in sorted(Path(record["folder"]).glob("*.png"))]
        return self.store.free_name(name), record["instance_prompt"], record["class_prompt"], images

    def adapter_choices(self) -> list[str]:
        return [NO_ADAPTER, *self.store.names()]


def train_tab(studio: Studio, demo: gr.Blocks, first_subject: str | None) -> None:
    """The Train tab: a form whose inputs are keyed by ``TrainSpec`` field, status, previews, start/stop/resume."""
    name, instance_prompt, class_prompt, images = studio.subject_fields(first_subject)
    with gr.Row():
        with gr.Column(scale=1):
            source = gr.Radio([SHIPPED, UPLOAD], value=SHIPPED, label="Images")
            subject = gr.Dropdown(list(studio.subjects), value=first_subject, label="Shipped subject")
            uploads = gr.File(file_count="multiple", file_types=["image"], label="Upload 3-10 images",
                              visible=False, elem_id="uploads")  # fmt: skip
            instance = gr.Gallery(images, label="Instance images", columns=5, height=140)
            form = {"adapter_name": gr.Textbox(name, label="Adapter name", elem_id="adapter-name")}
            with gr.Row():
                form["instance_prompt"] = gr.Textbox(
                    instance_prompt, label="Instance prompt (with identifier)", elem_id="instance-prompt"
                )
                form["class_prompt"] = gr.Textbox(class_prompt, label="Class prompt")
            with gr.Row():
                labels = [METHOD_LABELS[m] for m in ETHER_METHODS]
                form["method"] = gr.Radio(labels, value=METHOD_LABELS["ether_plus"], label="Method")
                form["n_blocks"] = gr.Number(1, precision=0, label="Blocks", minimum=1)
            with gr.Row():
                form["max_train_steps"] = gr.Number(400, precision=0, label="Steps", minimum=1, elem_id="train-steps")
                form["learning_rate"] = gr.Number(PAPER_LEARNING_RATE, label="Learning rate (paper: 6e-3)")
                form["seed"] = gr.Number(0, precision=0, label="Seed", minimum=0)
            with gr.Row():
                form["prior_preservation"] = gr.Checkbox(True, label="Prior preservation")
                form["num_class_images"] = gr.Number(50, precision=0, label="Class images", minimum=1,
                                                     elem_id="class-images")  # fmt: skip
            with gr.Accordion("Previews", open=False, elem_id="preview-settings"):
                with gr.Row():
                    form["preview_every"] = gr.Number(100, precision=0, label="Preview every N steps", minimum=1,
                                                      elem_id="preview-every")  # fmt: skip
                    form["preview_images"] = gr.Number(2, precision=0, label="Images per preview", minimum=1)
                    form["preview_steps"] = gr.Number(25, precision=0, label="Sampling steps", minimum=1,
                                                      elem_id="preview-steps")  # fmt: skip
                form["preview_prompt"] = gr.Textbox("", label="Preview prompt (empty: the instance prompt)")
            with gr.Row():
                start_btn = gr.Button("Start", variant="primary", elem_id="start")
                stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
                resume_btn = gr.Button("Resume", interactive=False, elem_id="resume")
        with gr.Column(scale=1):
            status = gr.Markdown(format_status(studio.jobs.status()), elem_id="train-status")
            previews = gr.Gallery(label="Previews (every N steps, from the step-0 baseline)", columns=4,
                                  height=420, elem_id="previews")  # fmt: skip
    shown = gr.State(-1)
    timer = gr.Timer(1.0)

    def poll(count: int):
        state = studio.jobs.status()
        found = [(p["path"], p["caption"]) for p in state.get("previews", [])]
        running = bool(state.get("running"))
        return (
            format_status(state),
            found if len(found) != count else gr.skip(),
            len(found),
            gr.update(interactive=not running),
            gr.update(interactive=running),
            gr.update(interactive=bool(state.get("resumable"))),
        )

    @page_errors
    def start(values: dict):
        chosen = values[source]
        if chosen == SHIPPED and not values[subject]:
            raise StudioError("pick a shipped subject, or switch to 'My images' and upload 3-10 images")
        fields = {key: values[component] for key, component in form.items()}
        fields.update(
            adapter_name=fields["adapter_name"] or "",
            instance_prompt=fields["instance_prompt"] or "",
            class_prompt=fields["class_prompt"] or "",
            preview_prompt=fields["preview_prompt"] or "",
            prior_preservation=bool(fields["prior_preservation"]),
            seed=int(fields["seed"] or 0),
            subject=values[subject] if chosen == SHIPPED else None,
            uploads=[str(u) for u in (values[uploads] or [])] if chosen == UPLOAD else [],
        )
        return format_status(studio.jobs.start(TrainSpec(**fields)))

    source.change(lambda s: (gr.update(visible=s == SHIPPED), gr.update(visible=s == UPLOAD)), source,
                  [subject, uploads])  # fmt: skip
    subject.change(studio.subject_fields, subject, [form["adapter_name"], form["instance_prompt"],
                                                    form["class_prompt"], instance])  # fmt: skip
    poll_outputs = [status, previews, shown, start_btn, stop_btn, resume_btn]
    timer.tick(poll, shown, poll_outputs, show_progress="hidden")
    demo.load(poll, gr.State(-1), poll_outputs, show_progress="hidden")
    inputs = {source, subject, uploads, *form.values()}  # a set: start() receives {component: value}
    start_btn.click(start, inputs, status).then(poll, gr.State(-1), poll_outputs)
    stop_btn.click(page_errors(lambda: format_status(studio.jobs.stop())), None, status)
    resume = page_errors(lambda: format_status(studio.jobs.resume()))
    resume_btn.click(resume, None, status).then(poll, gr.State(-1), poll_outputs)


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
            with gr.Row():
                seeds = gr.Textbox("0, 1", label="Seeds (e.g. 0, 1, 5-7)", elem_id="seeds")
                steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="sample-steps")
                guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
            compare = gr.Checkbox(True, label="Also the base model, same seed (side by side)")
            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=1):
            samples = gr.Gallery(label="Samples (adapter | base model)", columns=2, height=420, elem_id="samples")
            note = gr.Markdown("", elem_id="sample-note")
            downloads = gr.File(label="Download", file_count="multiple", interactive=False)

    @page_errors
    def sample(prompt_value, negative_value, seeds_value, steps_value, guidance_value, compare_value, *slot_values):
        adapters = [(n, float(w)) for n, w in zip(slot_values[::2], slot_values[1::2]) if n and n != NO_ADAPTER]
        request = SampleRequest(prompt=prompt_value or "", adapters=adapters, negative_prompt=negative_value or "",
                                seeds=parse_seeds(seeds_value), steps=int(steps_value),
                                guidance_scale=float(guidance_value), compare=bool(compare_value))  # fmt: skip
        result = studio.sampler.sample(request)
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
        new_name = gr.Textbox(label="New name")
        rename_btn = gr.Button("Rename")
        delete_btn = gr.Button("Delete", variant="stop")
        export_btn = gr.DownloadButton("Export (download)", elem_id="export")
    with gr.Row():
        import_file = gr.File(label="Import an adapter (.safetensors)", file_types=[".safetensors"])
        import_name = gr.Textbox(label="Name (empty: from the file name)")
        import_btn = gr.Button("Import")
    note = gr.Markdown("", elem_id="adapters-note")

    def view(chosen=None):
        infos = store.list()
        names = [i.name for i in infos]
        rows = [i.row() for i in infos] or [[""] * len(TABLE_HEADERS)]
        thumbnails = [(str(i.thumbnail), i.name) for i in infos if i.thumbnail is not None]
        return rows, thumbnails, gr.update(choices=names, value=chosen if chosen in names else next(iter(names), None))

    @page_errors
    def rename(old, new):
        if not old:
            raise StudioError("select an adapter to rename")
        name = store.rename(old, new)
        return (*view(name), f"renamed '{old}' to '{name}'")

    @page_errors
    def delete(name):
        if not name:
            raise StudioError("select an adapter to delete")
        store.delete(name)
        return (*view(), f"deleted '{name}'")

    @page_errors
    def import_adapter(upload, name):
        imported = store.import_file(upload, name, check_fits=studio.sampler.check_fits)
        info = store.info(imported)
        try:
            store.set_thumbnail(imported, studio.sampler.thumbnail(imported, steps=10))
        except StudioError:
            pass  # a thumbnail is a nicety; the import itself succeeded
        return (*view(imported), f"imported '{imported}' ({info.method}, {info.parameters:,} parameters)", None)

    @page_errors
    def export(name):
        """The file behind the Export button, following the selected adapter."""
        return gr.update(value=str(store.export(name)) if name else None, interactive=bool(name))

    outputs = [table, thumbs, selected]
    tab.select(view, selected, outputs)
    demo.load(view, None, outputs)
    rename_btn.click(rename, [selected, new_name], [*outputs, note])
    delete_btn.click(delete, selected, [*outputs, note])
    selected.change(export, selected, export_btn)
    import_btn.click(import_adapter, [import_file, import_name], [*outputs, note, import_file])


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
                train_tab(studio, demo, first)
            with gr.Tab("Sample", id="sample") as tab:
                sample_tab(studio, demo, tab, f"{prompt} on a blue background" if prompt else "")
            with gr.Tab("Adapters", id="adapters") as tab:
                adapters_tab(studio, demo, tab)
    demo.studio = {"workspace": studio.workspace, "jobs": studio.jobs, "sampler": studio.sampler,
                   "store": studio.store}  # fmt: skip
    return demo


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="ETHER Studio: train, sample and manage ETHER adapters")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--model", default=None, help="diffusers folder, hub id or single checkpoint file (default: the tiny model)"
    )
    parser.add_argument(
        "--config", default=None, help="for a single-file --model: a local diffusers folder of its architecture"
    )
    parser.add_argument("--workdir", default="outputs/studio", help="folder for adapters, jobs and samples")


def launch(args: argparse.Namespace, block: bool = True) -> gr.Blocks:
    from ether_diffusion.world.assets import ASSETS_DIR

    demo = build_app(args.model, args.workdir, args.config)
    workspace = demo.studio["workspace"]
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        allowed_paths=[str(workspace.root), str(ASSETS_DIR / "subjects")],
        max_file_size="60mb",
        show_error=True,
        ssr_mode=False,
        prevent_thread_lock=not block,
        theme=gr.themes.Soft(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"]),
        footer_links=[],
    )
    return demo


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    launch(build_parser(prog).parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
