"""The studio's two training forms on one base (``studio/forms.py``), checked without a model or a browser: the
shared settings are declared once, the files jobs and presets wrote still read, the checks say what to fix, the
studio's modules import one another without a cycle, and ``ether-diffusion studio`` without gradio says how to get
it."""

import ast
import dataclasses
import sys
from pathlib import Path

import pytest

from ether_diffusion.studio import ControlSpec, StudioError, TrainSpec
from ether_diffusion.studio.forms import COMMON_RANGES, FormSpec, short_rate

STUDIO = Path(__file__).resolve().parents[1] / "ether_diffusion" / "studio"
SHARED = ["adapter_name", "method", "n_blocks", "base_quantization", "max_train_steps", "learning_rate", "seed",
          "preview_every", "preview_prompt", "preview_images", "preview_steps", "guidance_scale"]  # fmt: skip

# A job's state.json ("spec") and a preset's "settings" hold these fields by name: the files the studio wrote
# before must still read, so the names are pinned here.
TRAIN_RECORD = {"adapter_name": "star", "instance_prompt": "a sks star", "subject": "orange_checkered_star",
                "uploads": [], "class_prompt": "a star", "method": "ether", "n_blocks": 2, "max_train_steps": 40,
                "learning_rate": 0.004, "prior_preservation": False, "num_class_images": 5, "seed": 3,
                "preview_every": 20, "preview_prompt": "a sks star on a hill", "preview_images": 1, "preview_steps": 9,
                "guidance_scale": 4.0, "checkpoint_every": 10}  # fmt: skip
CONTROL_RECORD = {"adapter_name": "shapes", "source": "edges", "data_dir": "", "scenes": 64, "method": "ether_plus",
                  "n_blocks": 4, "max_train_steps": 30, "learning_rate": 0.002, "encoder_learning_rate": 0.0002,
                  "train_batch_size": 2, "seed": 1, "preview_every": 10, "preview_prompt": "", "preview_images": 1,
                  "preview_steps": 5, "guidance_scale": 3.0}  # fmt: skip


#: fields added since those records were written: they read as the defaults
ADDED = {"base_quantization"}


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_both_forms_extend_one_base_with_the_shared_settings():
    assert field_names(FormSpec) == SHARED
    for form in (TrainSpec, ControlSpec):
        assert issubclass(form, FormSpec) and field_names(form)[: len(SHARED)] == SHARED
    assert set(field_names(TrainSpec)) == set(TRAIN_RECORD) | ADDED
    assert set(field_names(ControlSpec)) == set(CONTROL_RECORD) | ADDED
    # each form keeps its own defaults for the shared settings it sets differently
    assert (TrainSpec("a", "b").max_train_steps, TrainSpec("a", "b").learning_rate) == (400, 6e-3)
    assert (ControlSpec("a").max_train_steps, ControlSpec("a").learning_rate) == (300, 1e-3)
    assert TrainSpec.ranges() == {**COMMON_RANGES, "num_class_images": (1, 1000)}
    assert ControlSpec.ranges() == {**COMMON_RANGES, "scenes": (8, 20_000), "train_batch_size": (1, 64)}


def test_records_written_by_jobs_and_presets_still_read():
    train = TrainSpec(**TRAIN_RECORD)
    assert dataclasses.asdict(train) == {**TRAIN_RECORD, "base_quantization": "none"}
    assert train.validated() == train  # already in the library's terms: checking changes nothing
    control = ControlSpec(**CONTROL_RECORD)
    assert dataclasses.asdict(control) == {**CONTROL_RECORD, "base_quantization": "none"}
    assert control.validated() == control


def test_only_the_names_may_be_given_by_position():
    assert TrainSpec("star", "a sks star").instance_prompt == "a sks star"
    assert ControlSpec("shapes").adapter_name == "shapes"
    with pytest.raises(TypeError):
        TrainSpec("star", "a sks star", "orange_checkered_star")  # subject: by name only
    with pytest.raises(TypeError):
        ControlSpec("shapes", "edges")  # source: by name only


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (TrainSpec("s", "a sks star", subject="orange_checkered_star", method="LoRA"), "method 'LoRA': choose ETHER"),
        (TrainSpec("s", "a sks star", subject="orange_checkered_star", base_quantization="int4"),
         "base model weights 'int4' is not one of none, int8, nf4, float8"),
        (TrainSpec("../s", "a sks star", subject="orange_checkered_star"), "not allowed"),
        (TrainSpec("s", "a sks star", subject="orange_checkered_star", n_blocks=65), "n blocks must be a whole number "
         "from 1 to 64"),
        (TrainSpec("s", "a sks star", subject="orange_checkered_star", preview_images=2.5), "preview images must be"),
        (TrainSpec("s", "a sks star", subject="orange_checkered_star", num_class_images=0), "num class images must"),
        (TrainSpec("s", "a sks star", subject="orange_checkered_star", learning_rate=2), r"the learning rate must be "
         r"above 0 and at most 1 \(the paper uses 6e-3\)"),
        (TrainSpec("s", " ", subject="orange_checkered_star"), "the instance prompt is empty"),
        (TrainSpec("s", "a sks star", subject="orange_checkered_star", class_prompt=""), "needs a class prompt"),
        (TrainSpec("s", "a sks star", class_prompt="a star"), "no images"),
        (TrainSpec("s", "a sks star", subject="nobody", class_prompt="a star"), "no shipped subject 'nobody'"),
        (ControlSpec("c", max_train_steps=0), "max train steps must be a whole number from 1 to 100000"),
        (ControlSpec("c", train_batch_size=65), "train batch size must be a whole number from 1 to 64"),
        (ControlSpec("c", encoder_learning_rate=0), r"the encoder learning rate must be above 0 and at most 1 \(the "
         r"paper uses 1e-4\)"),
        (ControlSpec("c", source="depth"), "choose one of segmentation, edges, folder"),
    ],
)  # fmt: skip
def test_a_refused_form_says_what_to_fix(spec, message):
    with pytest.raises(StudioError, match=message):
        spec.validated()


def test_a_checked_form_is_a_copy_in_the_library_terms():
    form = TrainSpec("star", "a sks star", subject="orange_checkered_star", class_prompt="a star", method="ETHER",
                     n_blocks=4.0)  # fmt: skip
    checked = form.validated()
    assert (checked.method, checked.n_blocks, type(checked.n_blocks)) == ("ether", 4, int)
    assert (form.method, form.n_blocks) == ("ETHER", 4.0)  # the form itself is left as the page sent it
    assert ControlSpec("c", method="ETHER+").validated().method == "ether_plus"
    assert [short_rate(r) for r in (6e-3, 1e-3, 1e-4, 2.5e-5)] == ["6e-3", "1e-3", "1e-4", "2.5e-5"]


def studio_imports() -> dict[str, set[str]]:
    """For each module of ether_diffusion.studio, the studio modules it imports anywhere in its text (at the top or
    inside a function)."""
    modules = {path.stem for path in STUDIO.glob("*.py")}
    graph = {}
    for path in STUDIO.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name for alias in node.names)
        graph[path.stem] = found & modules
    return graph


def test_the_studio_modules_import_one_another_without_a_cycle():
    graph = studio_imports()
    assert "jobs" not in graph["control"] and "jobs" not in graph["forms"]  # the forms sit below the jobs
    assert graph["control"] >= {"forms"} and graph["jobs"] >= {"forms", "control"}
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join([*path, module])}"
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert len(done) >= 10


def test_only_the_ui_module_imports_gradio():
    uses = set()
    for path in STUDIO.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] == "gradio" for name in names):
                uses.add(path.stem)
    assert uses == {"ui"}


def test_the_studio_command_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    from ether_diffusion.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # any import of gradio now raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "ether_diffusion.studio.ui", raising=False)
    assert main(["studio", "--port", "1"]) == 2
    assert capsys.readouterr().err == "error: the studio needs gradio: pip install 'ether-diffusion[app]'\n"
