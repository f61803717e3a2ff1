"""DreamBooth training on a tiny pipeline built from configs: smoke run, resume, two processes, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_training_world, dreambooth_config, free_port, launch_env

from ether_diffusion import registry
from ether_diffusion.checkpoints import COMPLETE_MARKER, latest_checkpoint
from ether_diffusion.io import read_adapter_file
from ether_diffusion.models import ModelLoadError
from ether_diffusion.registry import train
from ether_diffusion.training.config import TaskKind

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_dreambooth_ether.py"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_training_world(tmp_path_factory.mktemp("dreambooth"), (24, 20))


def config_for(world, output_dir, **changes):
    """A run on the module's world (non-square images: random crops), validation sampled in 2 steps."""
    return dreambooth_config(world, output_dir, **{"num_validation_images": 2, "max_train_steps": None, **changes})


@pytest.mark.slow
def test_smoke_run_with_prior_preservation(world, tmp_path):
    config = config_for(
        world, tmp_path / "out", with_prior_preservation=True, class_prompt="a star", num_class_images=2,
        max_train_steps=2, validation_prompt="a sks star", validation_steps=1, train_text_encoder=True, snr_gamma=5.0,
        offset_noise=True, random_flip=True, report_to="tensorboard",
    )  # fmt: skip
    result = train(config)
    assert result.global_step == 2 and len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert sorted(p.name for p in (tmp_path / "out" / "class_images").iterdir()) == [
        "class-00000.png",
        "class-00001.png",
    ]
    source = read_adapter_file(result.adapter_path)
    assert set(source.configs) == {"unet", "text_encoder"} and source.configs["unet"].method == "ether_plus"
    assert source.extra["steps"] == "2"
    # validation at steps 0, 1, 2 and the reloaded-file grid, a model card, TensorBoard events
    assert len(list((tmp_path / "out" / "validation").glob("step-*.png"))) == 6
    assert (tmp_path / "out" / "samples.png").is_file()
    assert "a sks star" in (tmp_path / "out" / "README.md").read_text()
    assert list((tmp_path / "out" / "logs").rglob("events.out.tfevents*"))
    # a second run reuses the class images instead of generating them again
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "class_images").iterdir()}
    train(config_for(world, tmp_path / "out", with_prior_preservation=True, class_prompt="a star", num_class_images=2,
                     max_train_steps=1, no_final_reload=True))  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "class_images").iterdir()} == before


@pytest.mark.slow
def test_resume_gives_the_same_adapter(world, tmp_path):
    common = dict(max_train_steps=5, checkpointing_steps=2, random_flip=True, no_final_reload=True,
                  lr_scheduler="cosine", with_prior_preservation=True, class_prompt="a star", num_class_images=2,
                  class_data_dir=str(tmp_path / "class"))  # fmt: skip
    straight = train(config_for(world, tmp_path / "straight", **common))
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    # the interrupted run got as far as checkpoint-2 (and a partial checkpoint-4 it never finished writing)
    os.system(f"cp -r {tmp_path / 'straight' / 'checkpoint-2'} {interrupted}")
    os.system(f"cp -r {tmp_path / 'straight' / 'checkpoint-4'} {interrupted / '.checkpoint-4.partial'}")
    (interrupted / ".checkpoint-4.partial" / COMPLETE_MARKER).unlink()
    assert latest_checkpoint(interrupted).name == "checkpoint-2"
    resumed = train(config_for(world, interrupted, **common, resume_from_checkpoint="latest"))
    assert resumed.global_step == 5 and len(resumed.losses) == 3
    assert resumed.losses == straight.losses[2:]
    a, b = read_adapter_file(straight.adapter_path).tensors, read_adapter_file(resumed.adapter_path).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_checkpoint_retention(world, tmp_path):
    train(config_for(world, tmp_path, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=2,
                     no_final_reload=True))  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]


@pytest.mark.slow
def test_two_processes_train_one_adapter(world, tmp_path):
    launcher = Path(sys.executable).parent / "accelerate"
    command = [
        str(launcher),
        "launch",
        "--multi_gpu",  # torchrun-style launch; with no GPU the trainer runs data parallel on CPUs (gloo)
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(SCRIPT),
        "--pretrained_model_name_or_path",
        str(world / "model"),
        "--instance_data_dir",
        str(world / "instance"),
        "--instance_prompt",
        "a sks star",
        "--max_train_steps",
        "2",
        "--output_dir",
        str(tmp_path),
        "--report_to",
        "none",
        "--quiet",
        "--no_final_reload",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=launch_env())
    assert run.returncode == 0, run.stderr[-3000:]
    source = read_adapter_file(tmp_path / "ether_adapter.safetensors")
    assert source.extra["num_processes"] == "2" and source.extra["steps"] == "2", run.stdout + run.stderr


@pytest.mark.parametrize(
    "setup, changes, error, message",
    [
        ("missing", {}, FileNotFoundError, "does not exist"),
        ("empty", {}, ValueError, "holds no images"),
        ("text_only", {}, ValueError, r"holds no images .*notes.txt"),
        ("corrupt", {}, ValueError, r"cannot be read as images: broken.png"),
        ("good", {"pretrained_model_name_or_path": "/nonexistent/model"}, ModelLoadError, "not a diffusers"),
    ],
)
def test_bad_input_is_reported_before_training(world, tmp_path, setup, changes, error, message):
    folder = tmp_path / "instance"
    if setup != "missing":
        folder.mkdir()
    if setup == "text_only":
        (folder / "notes.txt").write_text("hello")
    if setup in ("corrupt", "good"):
        for i, path in enumerate(sorted((world / "instance").glob("*.png"))):
            (folder / f"{i}.png").write_bytes(path.read_bytes())
    if setup == "corrupt":
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = config_for(world, tmp_path / "out", max_train_steps=1, instance_data_dir=str(folder), **changes)
    with pytest.raises(error, match=message):
        train(config)
    assert not (tmp_path / "out" / "ether_adapter.safetensors").exists()


def test_contradicting_flags_and_unwritable_output(world, tmp_path, capsys):
    flags = ["--pretrained_model_name_or_path", str(world / "model"), "--instance_data_dir", str(world / "instance"),
             "--instance_prompt", "a sks star", "--output_dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit):  # the command line: usage errors that say what to do
        registry.parse_args(TaskKind.DREAMBOOTH, [*flags, "--with_prior_preservation"])
    assert "--with_prior_preservation needs --class_prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        registry.parse_args(TaskKind.DREAMBOOTH, [*flags, "--validation_steps", "2"])
    assert "need --validation_prompt" in capsys.readouterr().err
    if os.geteuid() == 0:
        blocked = tmp_path / "file-not-folder"
        blocked.write_text("x")
        target = blocked / "out"  # a path under a regular file cannot be created, even by root
    else:
        target = tmp_path / "ro"
        target.mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="cannot write to --output_dir"):
        train(config_for(world, target, max_train_steps=1))


@pytest.mark.slow
def test_interrupted_final_save_keeps_the_previous_adapter(world, tmp_path, monkeypatch):
    first = train(config_for(world, tmp_path, max_train_steps=1, no_final_reload=True))
    good = first.adapter_path.read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped while the file is being written

    monkeypatch.setattr("ether_diffusion.io.save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config_for(world, tmp_path, max_train_steps=1, no_final_reload=True, checkpointing_steps=9))
    assert first.adapter_path.read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
