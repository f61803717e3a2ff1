"""The console script, run as a user runs it."""

import ast
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TinyMLP, randomize_adapters

from ether_diffusion import EtherConfig, inject, save_adapter
from ether_diffusion.cli import TOOLS, main

CLI = str(Path(sys.executable).parent / "ether-diffusion")  # the console script installed beside this Python
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_inspect_summarises_and_rejects_bad_files(tmp_path):
    model = TinyMLP()
    inject(model, EtherConfig(method="ether", n_blocks=2, target_modules=["to_q", "to_k"]), "dog")
    randomize_adapters(model)
    path = save_adapter(tmp_path / "dog.safetensors", {"unet": model}, "dog", base_model="tiny", extra={"steps": "9"})
    out = subprocess.run([CLI, "inspect", str(path), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["adapter_name"] == "dog" and summary["base_model"] == "tiny"
    assert summary["parameters"] == 16 + 16 and summary["components"]["unet"]["layers"] == 2
    assert summary["extra"] == {"steps": "9"}
    text = subprocess.run([CLI, "inspect", str(path)], capture_output=True, text=True).stdout
    assert "ether, n_blocks=2" in text

    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    bad = subprocess.run([CLI, "inspect", str(tmp_path / "broken.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a readable safetensors file" in bad.stderr


def run_cli(*args):
    result = subprocess.run([CLI, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_train_sample_fuse_on_the_shipped_model(tmp_path):
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from ether_diffusion.assets import default_model_path, default_subjects_path
    from ether_diffusion.pipeline import load_ether_weights

    subject = default_subjects_path() / "orange_checkered_star"
    run_cli(
        "train",
        "--instance_data_dir",
        subject,
        "--instance_prompt",
        "a sks star",
        "--max_train_steps",
        2,
        "--output_dir",
        tmp_path / "adapter",
        "--report_to",
        "none",
        "--quiet",
        "--no_final_reload",
    )
    adapter = tmp_path / "adapter" / "ether_adapter.safetensors"
    assert "instance_prompt" in run_cli("inspect", adapter).stdout

    out = run_cli(
        "sample",
        "--adapter",
        f"{adapter}:0.5",
        "--prompt",
        "a sks star",
        "--seed",
        1,
        "--seed",
        2,
        "--compare",
        "--steps",
        2,
        "--output_dir",
        tmp_path / "samples",
    )
    assert len(out.stdout.split()) == 4 and len(list((tmp_path / "samples").glob("*.png"))) == 4

    run_cli("fuse", "--adapter", adapter, "--output_dir", tmp_path / "fused")
    fused = StableDiffusionPipeline.from_pretrained(tmp_path / "fused")
    unfused = StableDiffusionPipeline.from_pretrained(default_model_path())
    load_ether_weights(unfused, adapter)
    images = []
    for pipe in (fused, unfused):
        pipe.set_progress_bar_config(disable=True)
        images.append(
            pipe(
                "a sks star", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
            ).images
        )
    np.testing.assert_allclose(images[0], images[1], atol=1e-4)
    bad = subprocess.run(
        [CLI, "fuse", "--adapter", adapter, "--output_dir", tmp_path / "fused"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "not empty" in bad.stderr


@pytest.mark.slow
def test_demo_in_short_mode(tmp_path):
    run_cli(
        "demo",
        "--output_dir",
        tmp_path,
        "--max_train_steps",
        3,
        "--num_class_images",
        2,
        "--seeds_per_prompt",
        1,
        "--max_prompts",
        3,
        "--quiet",
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["train_steps"] == 3 and metrics["images_per_model"] == 3
    for key in ("base", "adapted", "instance_ceiling"):
        assert -1.0 <= metrics["subject_fidelity"][key] <= 1.0
    assert 0.0 <= metrics["prompt_fidelity"]["adapted"]["overall"] <= 1.0
    from PIL import Image

    grid = Image.open(tmp_path / "grid.png")
    # a title row with the prompts, then instance, base and adapted rows at 2× scale, one column per prompt
    assert grid.width == 90 + 3 * 128 and 3 * 128 + 16 + 14 <= grid.height <= 3 * 128 + 16 + 100
    assert metrics["grid_seed"] == 1000 and len(metrics["prompts"]) == 3


@pytest.mark.slow
def test_control_demo_in_short_mode(tmp_path):
    run_cli(
        "demo",
        "--task",
        "control",
        "--output_dir",
        tmp_path,
        "--max_train_steps",
        2,
        "--train_scenes",
        8,
        "--eval_scenes",
        2,
        "--quiet",
    )
    metrics = json.loads((tmp_path / "control_metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["task"] == "segmentation" and metrics["eval_scenes"] == 2
    for key in ("base_without_control", "with_control", "real_renders"):
        assert 0.0 <= metrics[key]["miou"] <= 1.0 and 0.0 <= metrics[key]["pixel_accuracy"] <= 1.0
    assert metrics["real_renders"]["miou"] > 0.9  # the evaluator reads the true scenes' masks back
    from PIL import Image

    grid = Image.open(tmp_path / "control_grid.png")
    assert grid.size == (2 * 128, 3 * 128)  # control, base and controlled rows at 2× scale
    assert (tmp_path / "model" / "ether_control.safetensors").is_file()


def _with_metadata(path, out, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta, tensors = {**f.metadata(), **changes}, {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("fingerprint", ["{not json", "null", '{"unet": []}', '{"unet": {"to_q": [16]}}', "[" * 5000])
def test_malformed_fingerprint_is_one_clear_error_in_inspect_and_sample(tmp_path, capsys, fingerprint):
    from ether_diffusion import cli

    model = TinyMLP()
    inject(model, EtherConfig(method="ether", target_modules=["to_q"]), "dog")
    good = save_adapter(tmp_path / "dog.safetensors", {"unet": model}, "dog")
    bad = _with_metadata(good, tmp_path / "bad.safetensors", fingerprint=fingerprint)
    for argv in (["inspect", str(bad)], ["sample", "--adapter", str(bad), "--prompt", "x", "--output_dir", "out"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: '{bad}'") and "fingerprint" in err and "Traceback" not in err
        assert err.count("\n") == 1  # one line


@pytest.mark.parametrize("group, verb", list(TOOLS))
def test_every_bench_and_world_tool_is_a_verb_with_its_own_flags(group, verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([group, verb, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: ether-diffusion {group} {verb} ")
    with pytest.raises(SystemExit) as exit_:
        main([group, verb, "--no_such_flag"])
    assert exit_.value.code == 2 and f"ether-diffusion {group} {verb}: error:" in capsys.readouterr().err


def test_the_scripts_are_launchers_of_the_verbs():
    """scripts/ holds entry points of a few lines: each tool's launcher calls the module its verb runs."""
    launched = {}
    for script in sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(script.read_text())
        sources = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        if len(script.read_text().splitlines()) <= 10 and len(sources) == 1:
            (module,) = sources
            imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
            assert imported == {"main", "parse_args"}, script.name
            launched[module] = script.name
    tools = {importlib.import_module(module, "ether_diffusion").__name__ for module, _ in TOOLS.values()}
    assert tools <= set(launched), tools - set(launched)
    for module in tools:
        assert callable(importlib.import_module(module).main) and callable(importlib.import_module(module).parse_args)


@pytest.mark.slow  # a subprocess: the end-to-end tier
def test_a_launcher_runs_from_a_checkout(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_host_overhead.py"), "--layers", "2", "--width", "8",
         "--rounds", "1", "--steps", "1", "--variants", "ether"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "| floor |" in run.stdout and "| ether |" in run.stdout


def test_make_subjects_writes_the_tiny_worlds_subjects(tmp_path, capsys):
    from ether_diffusion.world.subjects import load_subjects

    assert main(["world", "make-subjects", "--output_dir", str(tmp_path)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(load_subjects(tmp_path)) == 4


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    """Two-sided ETHER+ on the shipped tiny model's UNet attention (its strength acts quadratically)."""
    from ether_diffusion.models import load_pipeline
    from ether_diffusion.pipeline import delete_ether_adapters, save_ether_weights

    pipe = load_pipeline()
    inject(pipe.unet, EtherConfig(method="ether_plus"), "tmp")
    randomize_adapters(pipe.unet, "tmp")
    path = save_ether_weights(tmp_path_factory.mktemp("adapter") / "a.safetensors", pipe, "tmp")
    delete_ether_adapters(pipe, "tmp")
    return path


def one_line_error(capsys) -> str:
    """The one ``error:`` line the command ended with (diffusers' loading progress bars may come before it)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], err
    return lines[-1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "{a}", "--strength", "nan"], "argument --strength: 'nan' is not a finite number"),
        (["export", "{a}", "--strength=-inf"], "argument --strength: '-inf' is not a finite number"),
        (["export", "{a}:nan"], "argument adapter: the weight of '{a}:nan' is not a finite number: give one such as"),
        (["fuse", "--adapter", "{a}:inf", "--single_file", "{out}"], "the weight of '{a}:inf' is not a finite number"),
        (["sample", "--adapter", "{a}:nan", "--prompt", "x"], "the weight of '{a}:nan' is not a finite number"),
    ],
)
def test_a_strength_that_is_not_a_number_is_refused_at_parsing(tmp_path, capsys, argv, message):
    good = tmp_path / "good.safetensors"
    good.write_bytes(b"a good file")
    a = tmp_path / "a.safetensors"
    fill = {"a": a, "out": good}
    argv = [arg.format(**fill) for arg in argv]
    if argv[0] == "export":
        argv += ["--format", "kohya", "--output", str(good), "--overwrite"]
    with pytest.raises(SystemExit) as exit_:
        main(argv + (["--overwrite"] if argv[0] == "fuse" else []))
    assert exit_.value.code == 2
    assert message.format(**fill) in capsys.readouterr().err
    assert good.read_bytes() == b"a good file"


def test_fuse_to_a_folder_refuses_weights_beyond_the_dtype_and_keeps_the_folder(tiny_adapter, tmp_path, capsys):
    """--dtype fp16 of a strength-100000 fuse: the fused attention weights reach 1e8, beyond fp16's 65504."""
    folder = tmp_path / "fused"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    argv = ["fuse", "--adapter", f"{tiny_adapter}:100000", "--output_dir", str(folder), "--overwrite"]
    assert main([*argv, "--dtype", "fp16"]) == 2
    err = one_line_error(capsys)
    assert (
        err.startswith("error: the weight unet.down_blocks.") and ".to_q.weight holds values beyond fp16's range" in err
    )
    assert "write them in fp32 or bf16 (CLI: --dtype fp32), or fuse the adapters at a smaller strength" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused"] and os.listdir(folder) == ["model_index.json"]


@pytest.mark.parametrize(
    "verb, where, held",
    [
        ("export", "{adapter}", "is an adapter being read"),
        ("fuse", "{adapter}", "is an adapter being read"),
        ("fuse", "{model}", "is the base model"),
        ("fuse_dir", "{folder}", "holds the base model"),
    ],
)
def test_overwrite_never_replaces_an_input(tiny_adapter, tmp_path, capsys, verb, where, held):
    """--overwrite replaces an earlier output; an output that is the model or an adapter being read, or a folder
    holding one, is refused before anything loads."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    adapter = folder / "a.safetensors"
    adapter.write_bytes(tiny_adapter.read_bytes())
    model = folder / "model.safetensors"
    model.write_bytes(b"stands for a checkpoint: never read, the command stops first")
    output = where.format(adapter=adapter, model=model, folder=folder)
    argv = {
        "export": ["export", str(adapter), "--format", "kohya", "--output", output],
        "fuse": ["fuse", "--adapter", str(adapter), "--model", str(model), "--single_file", output],
        "fuse_dir": ["fuse", "--adapter", str(adapter), "--model", str(model), "--output_dir", output],
    }[verb]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: '{output}' {held} (") and err.endswith("it would replace its input"), err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_fuse_output_dir_that_is_a_file_is_refused(tiny_adapter, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    assert main(["fuse", "--adapter", str(tiny_adapter), "--output_dir", str(tmp_path / "out"), "--overwrite"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: '{tmp_path / 'out'}' is a file; --output_dir names a " \
        "folder to write"  # fmt: skip
    assert (tmp_path / "out").read_text() == "a file"


def test_a_full_disk_while_sampling_keeps_the_images_already_there(tmp_path, capsys, monkeypatch):
    from PIL import Image

    image = tmp_path / "00_seed0_base.png"
    image.write_bytes(b"an earlier image")

    def disk_full(self, fp, format=None, **params):
        with open(fp, "wb") as handle:
            handle.write(b"half an im")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    assert (
        main(["sample", "--prompt", "a red star", "--steps", "1", "--size", "16", "--output_dir", str(tmp_path)]) == 2
    )
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: could not write the image to '{image}': the disk is full (No space left on device in '{tmp_path}'); "
        "the file that was there is unchanged. Free some space or write elsewhere, then run again"
    )
    assert image.read_bytes() == b"an earlier image" and os.listdir(tmp_path) == [image.name]


@pytest.mark.parametrize(
    "flag, value, message",
    [("--guidance_scale", "nan", "not a finite number"), ("--steps", "0", "is not from 1 to 1000"),
     ("--steps", "1e9", "not a whole number"), ("--size", "100000", "is not from 8 to 8192")],
)  # fmt: skip
def test_sample_refuses_numbers_it_cannot_use_at_parsing(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--prompt", "a star", "--output_dir", str(tmp_path / "out"), flag, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_shows_the_defaults_and_every_family_train_covers(capsys):
    from ether_diffusion import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag, default in (("--learning_rate", "0.006"), ("--output_dir", "ether-dreambooth"),
                          ("--checkpointing_steps", "500"), ("--lr_scheduler", "constant")):  # fmt: skip
        assert re.search(rf"{flag} \S+ .*?\(default: {re.escape(default)}\)", text), flag
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "DreamBooth with ETHER on SD 1.x/2.x, SDXL, SD3 or Flux" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow  # fresh processes: the end-to-end tier
def test_startup_benchmark_times_each_command_and_they_print_no_warnings():
    """`bench startup` runs --help, an export and a one-step run as fresh processes; none of them writes anything to
    standard error (the transformers torchvision notes, diffusers' float32-cast warnings and the loading bars were
    there before issue 26)."""
    from ether_diffusion.bench import startup

    result = startup.main(startup.parse_args(["--rounds", "1"]))
    assert set(result) == {"--help", "export", "one-step run"}
    for name, row in result.items():
        assert row["median"] > 0 and row["stderr"] == "", (name, row["stderr"][-2000:])
