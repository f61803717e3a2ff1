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
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the studio works offline

import gradio as gr  # noqa: E402

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
    method = {"ether": "ETHER", "ether_plus": "ETHER+"}[spec["method"]]
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


def build_app(model: str | Path | None = None, workdir: str | Path = "outputs/studio") -> gr.Blocks:
    from ether_diffusion.world.assets import default_model_path

    model = str(model or default_model_path())
    workspace = Workspace(workdir)
    store = AdapterStore(workspace)
    jobs = JobManager(workspace, model, store)
    sampler = Sampler(model, workspace, store)
    subjects = shipped_subjects()
    first_subject = DEFAULT_SUBJECT if DEFAULT_SUBJECT in subjects else next(iter(subjects), None)

    def subject_fields(name):
        record = subjects.get(name)
        if record is None:
            return "", "", "", []
        folder = Path(record["folder"])
        images = [(str(p), p.name) for p in sorted(folder.glob("*.png"))]
        return store.free_name(name), record["instance_prompt"], record["class_prompt"], images

    def adapter_choices():
        return [NO_ADAPTER, *store.names()]

    # --- Train ---------------------------------------------------------------------------------------------------
    def poll(shown: int):
        state = jobs.status()
        previews = [(p["path"], p["caption"]) for p in state.get("previews", [])]
        gallery = previews if len(previews) != shown else gr.skip()
        running = bool(state.get("running"))
        return (
            format_status(state),
            gallery,
            len(previews),
            gr.update(interactive=not running),
            gr.update(interactive=running),
            gr.update(interactive=bool(state.get("resumable"))),
        )

    @page_errors
    def start(
        source,
        subject,
        uploads,
        name,
        instance_prompt,
        class_prompt,
        method,
        n_blocks,
        steps,
        lr,
        prior,
        seed,
        preview_every,
        preview_prompt,
        preview_images,
        preview_steps,
        num_class_images,
    ):
        spec = TrainSpec(
            adapter_name=name or "",
            instance_prompt=instance_prompt or "",
            subject=subject if source == SHIPPED else None,
            uploads=[str(u) for u in (uploads or [])] if source == UPLOAD else [],
            class_prompt=class_prompt or "",
            method=method,
            n_blocks=n_blocks,
            max_train_steps=steps,
            learning_rate=lr,
            prior_preservation=bool(prior),
            num_class_images=num_class_images,
            seed=int(seed or 0),
            preview_every=preview_every,
            preview_prompt=preview_prompt or "",
            preview_images=preview_images,
            preview_steps=preview_steps,
        )
        if source == SHIPPED and not subject:
            raise StudioError("pick a shipped subject, or switch to 'My images' and upload 3-10 images")
        return format_status(jobs.start(spec))

    @page_errors
    def stop():
        return format_status(jobs.stop())

    @page_errors
    def resume():
        return format_status(jobs.resume())

    # --- Sample --------------------------------------------------------------------------------------------------
    @page_errors
    def sample(prompt, negative, seeds, steps, guidance, compare, *slots):
        adapters = []
        for name, strength in zip(slots[::2], slots[1::2]):
            if name and name != NO_ADAPTER:
                adapters.append((name, float(strength)))
        request = SampleRequest(
            prompt=prompt or "",
            adapters=adapters,
            negative_prompt=negative or "",
            seeds=parse_seeds(seeds),
            steps=int(steps),
            guidance_scale=float(guidance),
            compare=bool(compare),
        )
        result = sampler.sample(request)
        gallery = [(str(p), c) for p, c in zip(result.paths, result.captions)]
        note = f"{len(result.images)} images in {result.seconds:.1f} s, saved in `{result.paths[0].parent}`"
        return gallery, [str(p) for p in result.paths], note

    def refresh_slots(*current):
        choices = adapter_choices()
        return [gr.update(choices=choices, value=c if c in choices else NO_ADAPTER) for c in current]

    # --- Adapters ------------------------------------------------------------------------------------------------
    def adapters_view(selected=None):
        infos = store.list()
        names = [i.name for i in infos]
        rows = [i.row() for i in infos] or [[""] * len(TABLE_HEADERS)]
        thumbs = [(str(i.thumbnail), i.name) for i in infos if i.thumbnail is not None]
        value = selected if selected in names else (names[0] if names else None)
        return rows, thumbs, gr.update(choices=names, value=value)

    @page_errors
    def rename(old, new):
        if not old:
            raise StudioError("select an adapter to rename")
        name = store.rename(old, new)
        return (*adapters_view(name), f"renamed '{old}' to '{name}'")

    @page_errors
    def delete(name):
        if not name:
            raise StudioError("select an adapter to delete")
        store.delete(name)
        return (*adapters_view(), f"deleted '{name}'")

    @page_errors
    def import_adapter(upload, name):
        imported = store.import_file(upload, name, check_fits=sampler.check_fits)
        info = store.info(imported)
        try:
            store.set_thumbnail(imported, sampler.thumbnail(imported, steps=10))
        except StudioError:
            pass  # a thumbnail is a nicety; the import itself succeeded
        message = f"imported '{imported}' ({info.method}, {info.parameters:,} parameters)"
        return (*adapters_view(imported), message, None)

    @page_errors
    def export(name):
        """The file behind the Export button, following the selected adapter."""
        return gr.update(value=str(store.export(name)) if name else None, interactive=bool(name))

    # --- layout --------------------------------------------------------------------------------------------------
    subject_name, subject_prompt, subject_class, subject_images = subject_fields(first_subject)
    with gr.Blocks(title="ETHER Studio", analytics_enabled=False) as demo:
        gr.Markdown(
            f"# ETHER Studio\nPersonalize Stable Diffusion with ETHER adapters (hyperplane reflections). "
            f"Base model: `{model}` · workspace: `{workspace.root}`"
        )
        with gr.Tabs():
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    with gr.Column(scale=1):
                        source = gr.Radio([SHIPPED, UPLOAD], value=SHIPPED, label="Images")
                        subject = gr.Dropdown(list(subjects), value=first_subject, label="Shipped subject")
                        uploads = gr.File(
                            file_count="multiple",
                            file_types=["image"],
                            label="Upload 3-10 images",
                            visible=False,
                            elem_id="uploads",
                        )
                        instance = gr.Gallery(subject_images, label="Instance images", columns=5, height=140)
                        name = gr.Textbox(subject_name, label="Adapter name", elem_id="adapter-name")
                        with gr.Row():
                            instance_prompt = gr.Textbox(
                                subject_prompt, label="Instance prompt (with identifier)", elem_id="instance-prompt"
                            )
                            class_prompt = gr.Textbox(subject_class, label="Class prompt")
                        with gr.Row():
                            method = gr.Radio(["ETHER", "ETHER+"], value="ETHER+", label="Method")
                            n_blocks = gr.Number(1, precision=0, label="Blocks", minimum=1)
                        with gr.Row():
                            steps = gr.Number(400, precision=0, label="Steps", minimum=1, elem_id="train-steps")
                            lr = gr.Number(PAPER_LEARNING_RATE, label="Learning rate (paper: 6e-3)")
                            seed = gr.Number(0, precision=0, label="Seed", minimum=0)
                        with gr.Row():
                            prior = gr.Checkbox(True, label="Prior preservation")
                            num_class_images = gr.Number(
                                50, precision=0, label="Class images", minimum=1, elem_id="class-images"
                            )
                        with gr.Accordion("Previews", open=False, elem_id="preview-settings"):
                            with gr.Row():
                                preview_every = gr.Number(
                                    100, precision=0, label="Preview every N steps", minimum=1, elem_id="preview-every"
                                )
                                preview_images = gr.Number(2, precision=0, label="Images per preview", minimum=1)
                                preview_steps = gr.Number(
                                    25, precision=0, label="Sampling steps", minimum=1, elem_id="preview-steps"
                                )
                            preview_prompt = gr.Textbox("", label="Preview prompt (empty: the instance prompt)")
                        with gr.Row():
                            start_btn = gr.Button("Start", variant="primary", elem_id="start")
                            stop_btn = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop")
                            resume_btn = gr.Button("Resume", interactive=False, elem_id="resume")
                    with gr.Column(scale=1):
                        status = gr.Markdown(format_status(jobs.status()), elem_id="train-status")
                        previews = gr.Gallery(
                            label="Previews (every N steps, from the step-0 baseline)",
                            columns=4,
                            height=420,
                            elem_id="previews",
                        )
                shown = gr.State(-1)
                timer = gr.Timer(1.0)

            with gr.Tab("Sample", id="sample") as sample_tab:
                with gr.Row():
                    with gr.Column(scale=1):
                        slots = []
                        for i in range(ADAPTER_SLOTS):
                            with gr.Row():
                                slots.append(
                                    gr.Dropdown(
                                        adapter_choices(),
                                        value=NO_ADAPTER,
                                        label=f"Adapter {i + 1}",
                                        elem_id=f"adapter-slot-{i}",
                                    )
                                )
                                slots.append(gr.Slider(-2, 2, value=1.0, step=0.05, label="Strength"))
                        refresh_btn = gr.Button("Refresh adapter list", size="sm")
                        prompt = gr.Textbox(
                            subject_prompt + " on a blue background" if subject_prompt else "",
                            label="Prompt",
                            elem_id="sample-prompt",
                        )
                        negative = gr.Textbox("", label="Negative prompt")
                        with gr.Row():
                            seeds = gr.Textbox("0, 1", label="Seeds (e.g. 0, 1, 5-7)", elem_id="seeds")
                            sample_steps = gr.Slider(1, 100, value=25, step=1, label="Steps", elem_id="sample-steps")
                            guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="Guidance")
                        compare = gr.Checkbox(True, label="Also the base model, same seed (side by side)")
                        generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Column(scale=1):
                        samples = gr.Gallery(
                            label="Samples (adapter | base model)", columns=2, height=420, elem_id="samples"
                        )
                        sample_note = gr.Markdown("", elem_id="sample-note")
                        downloads = gr.File(label="Download", file_count="multiple", interactive=False)

            with gr.Tab("Adapters", id="adapters") as adapters_tab:
                table = gr.Dataframe(
                    headers=TABLE_HEADERS, interactive=False, label="Saved adapters", elem_id="adapter-table"
                )
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
                adapters_note = gr.Markdown("", elem_id="adapters-note")

        # --- events ----------------------------------------------------------------------------------------------
        source.change(
            lambda s: (gr.update(visible=s == SHIPPED), gr.update(visible=s == UPLOAD)), source, [subject, uploads]
        )
        subject.change(subject_fields, subject, [name, instance_prompt, class_prompt, instance])
        poll_outputs = [status, previews, shown, start_btn, stop_btn, resume_btn]
        timer.tick(poll, shown, poll_outputs, show_progress="hidden")
        demo.load(poll, gr.State(-1), poll_outputs, show_progress="hidden")
        train_inputs = [
            source,
            subject,
            uploads,
            name,
            instance_prompt,
            class_prompt,
            method,
            n_blocks,
            steps,
            lr,
            prior,
            seed,
            preview_every,
            preview_prompt,
            preview_images,
            preview_steps,
            num_class_images,
        ]
        start_btn.click(start, train_inputs, status).then(poll, gr.State(-1), poll_outputs)
        stop_btn.click(stop, None, status)
        resume_btn.click(resume, None, status).then(poll, gr.State(-1), poll_outputs)

        dropdowns = slots[::2]
        for trigger in (sample_tab.select, refresh_btn.click, demo.load):
            trigger(refresh_slots, dropdowns, dropdowns)
        generate_btn.click(
            sample,
            [prompt, negative, seeds, sample_steps, guidance, compare, *slots],
            [samples, downloads, sample_note],
            concurrency_limit=8,  # clients queue on the sampler's lock and all get their images
        )

        view_outputs = [table, thumbs, selected]
        adapters_tab.select(adapters_view, selected, view_outputs)
        demo.load(adapters_view, None, view_outputs)
        rename_btn.click(rename, [selected, new_name], [*view_outputs, adapters_note])
        delete_btn.click(delete, selected, [*view_outputs, adapters_note])
        selected.change(export, selected, export_btn)
        import_btn.click(import_adapter, [import_file, import_name], [*view_outputs, adapters_note, import_file])

    demo.studio = {"workspace": workspace, "jobs": jobs, "sampler": sampler, "store": store}
    return demo


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="ETHER Studio: train, sample and manage ETHER adapters")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model", default=None, help="diffusers folder or hub id (default: the shipped tiny model)")
    parser.add_argument("--workdir", default="outputs/studio", help="folder for adapters, jobs and samples")


def launch(args: argparse.Namespace, block: bool = True) -> gr.Blocks:
    from ether_diffusion.world.assets import ASSETS_DIR

    demo = build_app(args.model, args.workdir)
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
