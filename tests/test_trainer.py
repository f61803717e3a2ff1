"""The loop every task runs (training/trainer.py) and the typed run configurations (training/config.py), on a tiny
pipeline built from configs: flags, finiteness, divergence, resume identity, precision, callbacks."""

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dreambooth_config
from PIL import Image
from safetensors.torch import load_file

from ether_diffusion.checkpoints import CheckpointError, list_checkpoints
from ether_diffusion.registry import train
from ether_diffusion.training import Callback, ConfigError, ResumeMismatchError, TrainingDivergedError
from ether_diffusion.training.dreambooth import DreamBoothConfig, DreamBoothTask
from ether_diffusion.training.sd import StableDiffusionBackend
from ether_diffusion.training.trainer import Trainer


@pytest.fixture(scope="module")
def world(training_world):
    return training_world


config_for = dreambooth_config


# --- configurations ------------------------------------------------------------------------------------------------


def test_the_parser_is_derived_from_the_fields():
    parser = DreamBoothConfig.build_parser()
    flags = {a.dest for a in parser._actions} - {"help"}
    cli_fields = {f.name for f in dataclasses.fields(DreamBoothConfig) if f.metadata.get("cli", True)}
    assert flags == cli_fields | set(DreamBoothConfig.foreign_flags)  # diffusers' flags without a field
    assert not cli_fields & set(DreamBoothConfig.foreign_flags)
    assert "peer" not in flags  # library-only (benchmarks)
    help_text = parser.format_help()
    assert help_text.index("--instance_data_dir") < help_text.index("--learning_rate")  # the task's own flags first
    config = DreamBoothConfig.from_args(["--instance_data_dir", "x", "--instance_prompt", "a sks dog"])
    assert isinstance(config, DreamBoothConfig) and config.learning_rate == 6e-3 and config.n_blocks == 1


@pytest.mark.parametrize(
    "flag, value",
    [("learning_rate", "inf"), ("prior_loss_weight", "nan"), ("max_grad_norm", "nan"), ("adam_epsilon", "-inf")],
)
def test_non_finite_flags_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit):
        DreamBoothConfig.from_args(["--instance_data_dir", "x", "--instance_prompt", "a sks dog", f"--{flag}={value}"])
    assert f"--{flag} is {float(value)}: give a finite number" in capsys.readouterr().err
    config = DreamBoothConfig(instance_data_dir="x", instance_prompt="a sks dog", **{flag: float(value)})
    with pytest.raises(ConfigError, match="finite"):
        config.validate()


def test_target_modules_is_a_list_of_presets_and_suffixes():
    base = {"instance_data_dir": "x", "instance_prompt": "a sks dog"}
    flags = ["--instance_data_dir", "x", "--instance_prompt", "a sks dog", "--target_modules"]
    spaced = DreamBoothConfig.from_args([*flags, "attn1.to_q,attn1.to_k", "attn2.to_q"])
    assert spaced.target_modules == ("attn1.to_q", "attn1.to_k", "attn2.to_q")
    assert spaced.adapter_config().target_suffixes == ("attn1.to_q", "attn1.to_k", "attn2.to_q")
    preset = DreamBoothConfig(**base, target_modules="unet-attention").validate()
    assert preset.target_modules == ("unet-attention",)
    assert preset.adapter_config().target_modules == "unet-attention"  # the file names the preset
    mixed = DreamBoothConfig(**base, target_modules=["unet-cross-attention-kv", "attn1.to_q"]).validate()
    assert mixed.adapter_config().target_suffixes == ("attn2.to_k", "attn2.to_v", "attn1.to_q")
    # a checkpoint or benchmark folder that recorded the names as one string compares equal to the list
    assert DreamBoothConfig.comparable({"target_modules": "a, b", "seed": 1}) == {"target_modules": ["a", "b"],
                                                                                "seed": 1}  # fmt: skip


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(n_blocks=0), "--n_blocks must be at least 1"),
        (dict(max_train_steps=2.5), "whole number"),
        (dict(learning_rate=0.0), "must be positive"),
        (dict(ether_method="lora"), "ether_method 'lora' is not one of"),
        (dict(adapter_name="../x"), "--adapter_name"),
        (dict(target_modules=" , "), "--target_modules is empty"),
        (dict(resolution=60), "multiple of 8"),
        (dict(with_prior_preservation=True), "needs --class_prompt"),
        (dict(validation_epochs=1), "need --validation_prompt"),
        (dict(instance_prompt="  "), "instance_prompt is empty"),
        (dict(report_to="wandb"), "wandb"),
    ],
)
def test_bad_configurations_say_what_to_do(changes, message):
    if changes.get("report_to") == "wandb":
        try:
            import wandb  # noqa: F401

            pytest.skip("wandb is installed here, so --report_to wandb is valid")
        except ImportError:
            pass
    config = DreamBoothConfig(**{"instance_data_dir": "x", "instance_prompt": "a sks dog", **changes})
    with pytest.raises(ConfigError, match=message):
        config.validate()


# --- the loop ------------------------------------------------------------------------------------------------------


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def on_prepare(self, preparation):
        self.events.append(("prepare", preparation.message, preparation.done, preparation.total))

    def on_train_start(self, total_steps, start_step):
        self.events.append(("start", total_steps, start_step))

    def on_step(self, step, logs):
        self.events.append(("step", step, sorted(logs)))

    def on_validation(self, event):
        self.events.append(("validation", event.step, event.kind, len(event.images), len(event.paths)))

    def on_checkpoint(self, step, path):
        self.events.append(("checkpoint", step, path.name))

    def on_save(self, path):
        self.events.append(("save", path.name))

    def on_train_end(self, result):
        self.events.append(("end", result.global_step))


@pytest.mark.slow
def test_callbacks_see_every_event_in_order(world, tmp_path):
    recorder = Recorder()
    config = config_for(world, tmp_path, validation_prompt="a sks star", validation_steps=2, checkpointing_steps=1,
                        with_prior_preservation=True, class_prompt="a star", num_class_images=2,
                        sample_batch_size=1)  # fmt: skip
    result = train(config, [recorder])
    kinds = [e[0] for e in recorder.events]
    assert kinds[:2] == ["prepare", "prepare"] and kinds[-1] == "end"
    class_progress = [e for e in recorder.events if e[0] == "prepare" and e[3] == 2]
    assert [e[2] for e in class_progress] == [0, 1, 2]  # drawing class images, counted
    after = recorder.events[len([k for k in kinds if k == "prepare"]) :]
    assert after == [
        ("validation", 0, "baseline", 1, 1),
        ("start", 2, 0),
        ("step", 1, ["instance_loss", "loss", "lr", "prior_loss"]),
        ("checkpoint", 1, "checkpoint-1"),
        ("step", 2, ["instance_loss", "loss", "lr", "prior_loss"]),
        ("checkpoint", 2, "checkpoint-2"),
        ("validation", 2, "preview", 1, 1),
        ("save", "ether_adapter.safetensors"),
        ("validation", 2, "final", 1, 1),
        ("end", 2),
    ]
    card = (tmp_path / "README.md").read_text()
    assert "mixed precision no" in card and "1 processes" in card
    assert result.mixed_precision == "no"


class NaNAt(DreamBoothTask):
    """DreamBooth whose loss turns NaN at one step (what an exploding run looks like to the loop)."""

    def __init__(self, config, step):
        super().__init__(config, StableDiffusionBackend(config))
        self.calls, self.bad_step = 0, step

    def loss(self, batch, run):
        self.calls += 1
        loss, parts = super().loss(batch, run)
        if self.calls == self.bad_step:
            loss = loss * float("nan")
            parts = {**parts, "loss": loss.detach()}
        return loss, parts


def test_a_diverging_run_stops_and_keeps_the_good_files(world, tmp_path):
    good = train(config_for(world, tmp_path, max_train_steps=1, no_final_reload=True)).adapter_path
    good_bytes = good.read_bytes()
    config = config_for(world, tmp_path, max_train_steps=4, checkpointing_steps=1, checkpoints_total_limit=5)
    with pytest.raises(TrainingDivergedError, match="the loss is nan at step 3.*Lower --learning_rate"):
        Trainer(NaNAt(config.validate(), step=3)).train()
    assert good.read_bytes() == good_bytes  # the previous adapter is untouched
    assert [c.name for c in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]  # none from step 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_run(world, tmp_path):
    train(config_for(world, tmp_path, max_train_steps=2, checkpointing_steps=1, no_final_reload=True))
    other = config_for(world, tmp_path, max_train_steps=4, learning_rate=1e-3, resume_from_checkpoint="latest")
    with pytest.raises(ResumeMismatchError, match=r"--learning_rate: checkpoint 0.006, now 0.001"):
        train(other)
    # the same run, only longer and with other logging: that is a resume
    same = config_for(world, tmp_path, max_train_steps=3, resume_from_checkpoint="latest", quiet=False)
    result = train(same)
    assert result.global_step == 3 and len(result.losses) == 1


def test_resuming_from_the_last_steps_checkpoint_trains_no_further(world, tmp_path):
    # 2 steps of batch 1 end inside the first epoch (the world has 3 instance images): a resume from that checkpoint
    # must not run the epoch's next batch (one step past --max_train_steps)
    config = config_for(world, tmp_path, max_train_steps=2, checkpointing_steps=2, no_final_reload=True)
    first = train(config)
    trained = load_file(first.adapter_path)
    again = train(config.replace(resume_from_checkpoint="latest"))
    assert again.global_step == 2 and again.losses == []
    resumed = load_file(again.adapter_path)
    assert resumed.keys() == trained.keys()
    for key in trained:
        torch.testing.assert_close(resumed[key], trained[key], rtol=0, atol=0)


def test_fp16_on_a_cpu_is_refused_whoever_asks(world, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is valid on this CUDA machine")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        train(config_for(world, tmp_path, mixed_precision="fp16"))
    # `accelerate launch --mixed_precision fp16` asks through the environment of a fresh process, not the flag
    from conftest import launch_env

    env = {**launch_env(), "ACCELERATE_MIXED_PRECISION": "fp16"}
    cli = Path(sys.executable).parent / "ether-diffusion"
    run = subprocess.run(
        [str(cli), "train", "--pretrained_model_name_or_path", str(world / "model"), "--instance_data_dir",
         str(world / "instance"), "--instance_prompt", "a sks star", "--output_dir", str(tmp_path), "--quiet",
         "--max_train_steps", "1", "--report_to", "none"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert "fp16 mixed precision (from --mixed_precision or accelerate's configuration) needs a CUDA GPU" in run.stderr
    assert not (tmp_path / "ether_adapter.safetensors").exists()


def test_prior_generation_precision_draws_class_images_in_that_dtype(world, tmp_path):
    common = dict(with_prior_preservation=True, class_prompt="a star", num_class_images=1, max_train_steps=1,
                  no_final_reload=True, validation_inference_steps=3)  # fmt: skip
    train(config_for(world, tmp_path / "fp32", class_data_dir=str(tmp_path / "c32"), **common))
    train(config_for(world, tmp_path / "bf16", class_data_dir=str(tmp_path / "c16"),
                     prior_generation_precision="bf16", **common))  # fmt: skip
    fp32 = np.asarray(Image.open(tmp_path / "c32" / "class-00000.png"), dtype=np.int16)
    bf16 = np.asarray(Image.open(tmp_path / "c16" / "class-00000.png"), dtype=np.int16)
    assert fp32.shape == bf16.shape and not np.array_equal(fp32, bf16)  # bf16 rounding shows in the pixels
    assert np.abs(fp32 - bf16).mean() < 40  # ... but it is the same image


def test_a_stop_during_preparation_ends_before_any_step(world, tmp_path):
    class StopWhileDrawing(Recorder):
        def should_stop(self):
            return any(e[0] == "prepare" and e[3] for e in self.events)  # once class images are being drawn

    recorder = StopWhileDrawing()
    config = config_for(world, tmp_path, with_prior_preservation=True, class_prompt="a star", num_class_images=3,
                        sample_batch_size=1)  # fmt: skip
    result = train(config, [recorder])
    assert result.stopped_early and result.adapter_path is None and result.global_step == 0
    assert [e[0] for e in recorder.events if e[0] in ("start", "step", "save")] == []
    assert not (tmp_path / "ether_adapter.safetensors").exists() and not list_checkpoints(tmp_path)
    assert math.isfinite(result.train_seconds) and os.path.isdir(tmp_path)


def test_a_full_disk_during_a_checkpoint_leaves_no_partial_folder(world, tmp_path, monkeypatch):
    real_save = torch.save

    def disk_fills_up(obj, f, *args, **kwargs):
        if ".checkpoint-2.partial" in str(f):  # checkpoint-1 fits, checkpoint-2 does not
            Path(f).write_bytes(b"\0" * 64)
            raise RuntimeError(
                "[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4056\nfile write failed"
            )
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    config = config_for(world, tmp_path, max_train_steps=3, checkpointing_steps=1, no_final_reload=True)
    with pytest.raises(CheckpointError, match=r"could not write the checkpoint at step 2 .*file write failed.*"
                       r"checkpoint-1 is intact.*resume with --resume_from_checkpoint latest"):  # fmt: skip
        train(config)
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run resumes from checkpoint-1
    result = train(config.replace(resume_from_checkpoint="latest"))
    assert result.global_step == 3 and len(result.losses) == 2


def test_a_full_disk_at_the_final_save_keeps_the_previous_adapter(world, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    good = train(config_for(world, tmp_path, max_train_steps=1, no_final_reload=True)).adapter_path
    good_bytes = good.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # what got written before the disk filled up
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("ether_diffusion.io.save_file", disk_full)
    with pytest.raises(OSError, match=r"could not write the adapter to .*No space left on device.*unchanged"):
        train(config_for(world, tmp_path, max_train_steps=1, checkpointing_steps=5, no_final_reload=True))
    assert good.read_bytes() == good_bytes
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_compile_trains_the_same_adapter(world, tmp_path):
    """--compile runs the loop with the UNet's transformer blocks compiled (the default scope) or the whole UNet
    (--compile_scope model), here with aot_eager (the traced forward and backward graphs without code generation,
    fast on a CPU), and trains what the eager loop trains."""
    from conftest import launch_env

    from ether_diffusion.io import read_adapter_file

    cli = Path(sys.executable).parent / "ether-diffusion"
    common = ["train", "--pretrained_model_name_or_path", str(world / "model"), "--instance_data_dir",
              str(world / "instance"), "--instance_prompt", "a sks star", "--quiet", "--max_train_steps", "3",
              "--report_to", "none", "--ether_method", "ether_plus", "--n_blocks", "2"]  # fmt: skip
    files = {}
    compiled = ["--compile", "--dynamo_backend", "aot_eager"]
    for name, extra in (("eager", []), ("blocks", compiled), ("model", [*compiled, "--compile_scope", "model"])):
        out = tmp_path / name
        run = subprocess.run(
            [str(cli), *common, "--output_dir", str(out), *extra],
            capture_output=True,
            text=True,
            env=launch_env(),
            timeout=600,
        )  # fmt: skip  (a fresh process: accelerate's state)
        assert run.returncode == 0, run.stderr[-3000:]
        files[name] = read_adapter_file(out / "ether_adapter.safetensors").tensors
        card = (out / "README.md").read_text()
        assert f"torch.compile {'aot_eager' if extra else 'no'}" in card  # the UNet really ran compiled
        if name == "blocks":
            assert "torch.compile aot_eager (unet: 4 BasicTransformerBlock)" in card, card
    for name in ("blocks", "model"):
        assert files["eager"].keys() == files[name].keys()
        for key, value in files["eager"].items():
            torch.testing.assert_close(files[name][key], value, rtol=1e-4, atol=1e-6)


def test_a_finished_run_says_where_everything_went(world, tmp_path, capsys):
    """What `ether-diffusion train` and `accelerate launch scripts/train_dreambooth_ether.py` print at the end."""
    config = config_for(world, tmp_path, checkpointing_steps=1, validation_prompt="a sks star", validation_steps=2,
                        no_final_reload=True, output_kohya_format=True)  # fmt: skip
    result = train(config)
    out = capsys.readouterr().out
    kohya = tmp_path / "pytorch_lora_weights_kohya.safetensors"  # --output_kohya_format, as diffusers' SDXL script
    assert f"  LoRA export      {kohya}" in out and result.exports == [kohya]
    assert all(key.startswith("lora_unet_") for key in load_file(kohya))
    assert f"trained 2 steps in {result.train_seconds:.0f} s; written to {tmp_path}:" in out
    assert f"  adapter          {tmp_path / 'ether_adapter.safetensors'}" in out
    assert f"  model card       {tmp_path / 'README.md'}" in out
    assert "  checkpoints      checkpoint-1, checkpoint-2 (resume: --resume_from_checkpoint latest)" in out
    assert f"  validation       2 images in {tmp_path / 'validation'}" in out  # the step-0 baseline and step 2
    assert "final samples" not in out  # --no_final_reload: none were made


def test_the_time_left_leaves_out_saving_and_sampling(monkeypatch):
    from ether_diffusion.training import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    bar = progress.Progress(total=10, desc="step", interactive=False)
    now[0] += 2.0  # two training steps of 1 s
    bar.update(2)
    with bar.paused():  # a 60 s preview
        now[0] += 60.0
    now[0] += 1.0
    bar.update(3)
    assert bar.line({}).endswith("1.00 s/it  elapsed 0:03, left 0:07"), bar.line({})
