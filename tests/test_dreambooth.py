"""DreamBooth training on a tiny pipeline built from configs: smoke run, resume, two processes, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_training_world, free_port, launch_env

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


def args_for(world, output_dir, *extra):
    return registry.parse_args(
        TaskKind.DREAMBOOTH,
        [
            "--pretrained_model_name_or_path",
            str(world / "model"),
            "--instance_data_dir",
            str(world / "instance"),
            "--instance_prompt",
            "a sks star",
            "--output_dir",
            str(output_dir),
            "--quiet",
            "--report_to",
            "none",
            "--validation_inference_steps",
            "2",
            "--num_validation_images",
            "2",
            *extra,
        ],
    )


@pytest.mark.slow
def test_smoke_run_with_prior_preservation(world, tmp_path):
    args = args_for(
        world,
        tmp_path / "out",
        "--with_prior_preservation",
        "--class_prompt",
        "a star",
        "--num_class_images",
        "2",
        "--max_train_steps",
        "2",
        "--validation_prompt",
        "a sks star",
        "--validation_steps",
        "1",
        "--train_text_encoder",
        "--snr_gamma",
        "5",
        "--offset_noise",
        "--random_flip",
        "--report_to",
        "tensorboard",
    )
    result = train(args)
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
    train(
        args_for(
            world,
            tmp_path / "out",
            "--with_prior_preservation",
            "--class_prompt",
            "a star",
            "--num_class_images",
            "2",
            "--max_train_steps",
            "1",
            "--no_final_reload",
        )
    )
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "class_images").iterdir()} == before


@pytest.mark.slow
def test_resume_gives_the_same_adapter(world, tmp_path):
    common = [
        "--max_train_steps",
        "5",
        "--checkpointing_steps",
        "2",
        "--random_flip",
        "--no_final_reload",
        "--lr_scheduler",
        "cosine",
        "--with_prior_preservation",
        "--class_prompt",
        "a star",
        "--num_class_images",
        "2",
        "--class_data_dir",
        str(tmp_path / "class"),
    ]
    straight = train(args_for(world, tmp_path / "straight", *common))
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    # the interrupted run got as far as checkpoint-2 (and a partial checkpoint-4 it never finished writing)
    os.system(f"cp -r {tmp_path / 'straight' / 'checkpoint-2'} {interrupted}")
    os.system(f"cp -r {tmp_path / 'straight' / 'checkpoint-4'} {interrupted / '.checkpoint-4.partial'}")
    (interrupted / ".checkpoint-4.partial" / COMPLETE_MARKER).unlink()
    assert latest_checkpoint(interrupted).name == "checkpoint-2"
    resumed = train(args_for(world, interrupted, *common, "--resume_from_checkpoint", "latest"))
    assert resumed.global_step == 5 and len(resumed.losses) == 3
    assert resumed.losses == straight.losses[2:]
    a, b = read_adapter_file(straight.adapter_path).tensors, read_adapter_file(resumed.adapter_path).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_checkpoint_retention(world, tmp_path):
    train(
        args_for(
            world,
            tmp_path,
            "--max_train_steps",
            "4",
            "--checkpointing_steps",
            "1",
            "--checkpoints_total_limit",
            "2",
            "--no_final_reload",
        )
    )
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
    "setup, flags, error, message",
    [
        ("missing", [], FileNotFoundError, "does not exist"),
        ("empty", [], ValueError, "holds no images"),
        ("text_only", [], ValueError, r"holds no images .*notes.txt"),
        ("corrupt", [], ValueError, r"cannot be read as images: broken.png"),
        ("good", ["--pretrained_model_name_or_path", "/nonexistent/model"], ModelLoadError, "not a diffusers"),
    ],
)
def test_bad_input_is_reported_before_training(world, tmp_path, setup, flags, error, message):
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
    args = args_for(world, tmp_path / "out", "--max_train_steps", "1")
    args.instance_data_dir = str(folder)
    if flags:
        args.pretrained_model_name_or_path = flags[1]
    with pytest.raises(error, match=message):
        train(args)
    assert not (tmp_path / "out" / "ether_adapter.safetensors").exists()


def test_contradicting_flags_and_unwritable_output(world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        args_for(world, tmp_path, "--with_prior_preservation")
    assert "--with_prior_preservation needs --class_prompt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        args_for(world, tmp_path, "--validation_steps", "2")
    assert "need --validation_prompt" in capsys.readouterr().err
    if os.geteuid() == 0:
        blocked = tmp_path / "file-not-folder"
        blocked.write_text("x")
        target = blocked / "out"  # a path under a regular file cannot be created, even by root
    else:
        target = tmp_path / "ro"
        target.mkdir(mode=0o500)
    args = args_for(world, target, "--max_train_steps", "1")
    with pytest.raises(PermissionError, match="cannot write to --output_dir"):
        train(args)


@pytest.mark.slow
def test_interrupted_final_save_keeps_the_previous_adapter(world, tmp_path, monkeypatch):
    first = train(args_for(world, tmp_path, "--max_train_steps", "1", "--no_final_reload"))
    good = first.adapter_path.read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process is stopped while the file is being written

    monkeypatch.setattr("ether_diffusion.io.save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        train(args_for(world, tmp_path, "--max_train_steps", "1", "--no_final_reload", "--checkpointing_steps", "9"))
    assert first.adapter_path.read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
