"""Controllable synthesis: encoder layout and zero init, control images, dataset rows, the one-file format, the
pipeline (control to both guidance branches), and the training script with resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import png_header
from PIL import Image

from ether_diffusion import AdapterFileError, AdapterMismatchError, EtherConfig, inject, registry
from ether_diffusion.assets import default_model_path
from ether_diffusion.config import TARGET_PRESETS
from ether_diffusion.control import (
    ConditionEncoder,
    ConditionEncoderConfig,
    ConditionMismatchError,
    ControlDataError,
    ControlDataset,
    EtherControlPipeline,
    attach_condition_encoder,
    control_to_tensor,
    save_control_weights,
    set_condition,
    write_world_control_dataset,
)
from ether_diffusion.control.data import SEGMENTATION_PALETTE, mask_to_control
from ether_diffusion.control.train import ControlConfig
from ether_diffusion.registry import train
from ether_diffusion.training.config import TaskKind


@pytest.fixture(scope="module")
def pipe():
    p = EtherControlPipeline.from_pretrained(str(default_model_path()), safety_checker=None)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_world_control_dataset(tmp_path_factory.mktemp("seg"), "segmentation", 8, start=10_000_000)


def test_encoder_has_the_papers_layout_and_starts_at_zero():
    sd = ConditionEncoder(ConditionEncoderConfig())  # SD-1.5: 8 convs, 3 stride-2 steps, 320 channels out
    convs = [m for m in sd.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 8 and [c.stride[0] for c in convs].count(2) == 3
    assert sum(p.numel() for p in sd.parameters()) == 1_086_480  # the paper's ~1.09M
    out = sd(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 320, 8, 8) and not out.any()


def test_encoder_matches_the_tiny_model(pipe):
    config = ConditionEncoderConfig.for_model(pipe.unet, pipe.vae_scale_factor)
    assert config.downsample_factor == pipe.vae_scale_factor == 4
    encoder = ConditionEncoder(config)
    encoder.check_fits(pipe.unet, pipe.vae_scale_factor)
    assert encoder(torch.rand(1, 3, 64, 64)).shape == (1, pipe.unet.conv_in.out_channels, 16, 16)
    with pytest.raises(ConditionMismatchError, match="320 channels"):
        ConditionEncoder(ConditionEncoderConfig()).check_fits(pipe.unet, pipe.vae_scale_factor)


def test_fresh_encoder_with_identity_ether_plus_is_the_base_model(pipe):
    unet = pipe.unet
    latents, t, hidden = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 128)
    with torch.no_grad():
        base = unet(latents, t, hidden).sample
        inject(unet, EtherConfig(method="ether_plus", target_modules=list(TARGET_PRESETS["unet-attention-ff"])), "c")
        encoder = ConditionEncoder(ConditionEncoderConfig.for_model(unet, 4))
        attach_condition_encoder(unet, encoder)
        set_condition(unet, encoder(torch.rand(2, 3, 64, 64)))
        first = unet(latents, t, hidden).sample
        torch.nn.init.normal_(encoder.conv_out.weight, std=0.1)  # a trained encoder changes the output
        set_condition(unet, encoder(torch.rand(2, 3, 64, 64)))
        changed = unet(latents, t, hidden).sample
    from ether_diffusion.control.encoder import detach_condition_encoder
    from ether_diffusion.inject import delete_adapter

    detach_condition_encoder(unet)
    delete_adapter(unet, "c")
    torch.testing.assert_close(first, base, rtol=0, atol=1e-5)
    assert (changed - base).abs().max() > 1e-3


def test_control_images_are_checked_strictly():
    good = mask_to_control(np.zeros((64, 64), dtype=np.uint8))
    assert control_to_tensor(good, 64, 64).shape == (3, 64, 64)
    gray = Image.new("L", (64, 64), 255)  # edge maps may be grayscale: repeated to 3 channels
    assert control_to_tensor(gray, 64, 64).min() == 1.0
    with pytest.raises(ControlDataError, match="32×32 but the output is 64×64"):
        control_to_tensor(Image.new("RGB", (32, 32)), 64, 64)
    with pytest.raises(ControlDataError, match="mode 'CMYK'"):
        control_to_tensor(Image.new("CMYK", (64, 64)), 64, 64)
    with pytest.raises(ControlDataError, match="4 channels"):
        control_to_tensor(np.zeros((64, 64, 4), dtype=np.uint8), 64, 64)
    with pytest.raises(ControlDataError, match=r"\[0, 1\]"):
        control_to_tensor(torch.full((3, 64, 64), 2.0), 64, 64)
    with pytest.raises(ControlDataError, match="PIL image"):
        control_to_tensor("control.png", 64, 64)


def test_world_dataset_rows_line_up(dataset, pipe):
    rows = [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["text"].startswith("a ") and " at " not in r["text"] for r in rows)
    mask = np.asarray(Image.open(dataset / "masks" / "10000000.png"))
    control = np.asarray(Image.open(dataset / rows[0]["conditioning_image"]))
    assert (control == SEGMENTATION_PALETTE[mask]).all() and mask.max() > 0
    item = ControlDataset(dataset, pipe.tokenizer, 64)[0]
    assert item["pixel_values"].shape == item["conditioning_pixel_values"].shape == (3, 64, 64)
    assert 0 <= item["conditioning_pixel_values"].min() and item["conditioning_pixel_values"].max() <= 1


def test_bad_dataset_rows_are_named(dataset, pipe, tmp_path):
    with pytest.raises(ControlDataError, match="no metadata.jsonl"):
        ControlDataset(tmp_path, pipe.tokenizer, 64)
    lines = (dataset / "metadata.jsonl").read_text().splitlines()
    broken = tmp_path / "broken"
    os.symlink(dataset / "images", tmp_path / "images")
    broken.mkdir()
    for sub in ("images", "conditions"):
        os.symlink(dataset / sub, broken / sub)
    row2 = json.loads(lines[1])
    del row2["text"]
    row3 = json.loads(lines[2])
    row3["conditioning_image"] = "conditions/nope.png"
    (broken / "metadata.jsonl").write_text("\n".join([lines[0], json.dumps(row2), json.dumps(row3), "{oops"]))
    with pytest.raises(ControlDataError) as err:
        ControlDataset(broken, pipe.tokenizer, 64)
    message = str(err.value)
    assert "line 2: no 'text'" in message and "line 3: missing file conditions/nope.png" in message
    assert "line 4: not JSON" in message


def _linked_rows(dataset, folder, lines: list[bytes]):
    """A dataset folder sharing ``dataset``'s images, with ``lines`` as its metadata.jsonl."""
    folder.mkdir()
    for sub in ("images", "conditions"):
        os.symlink(dataset / sub, folder / sub)
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return folder


def test_metadata_is_read_with_a_limit_and_every_problem_is_named(dataset, pipe, tmp_path):
    """Text that is not UTF-8, a line or caption over its limit, a line that is not an object, and images that are
    too large or not images stop the dataset when it opens, naming the line (and file); none is read whole."""
    first, second, third, *_ = (dataset / "metadata.jsonl").read_bytes().splitlines()
    row = json.loads(second)
    latin = json.dumps({**row, "text": "a red circle, señor"}, ensure_ascii=False).encode("latin-1")
    with pytest.raises(ControlDataError, match=r"metadata.jsonl', line 2 is not UTF-8 text \(byte 0xf1 .*UTF-8 text"):
        ControlDataset(_linked_rows(dataset, tmp_path / "latin", [first, latin]), pipe.tokenizer, 64)
    huge = json.dumps({**row, "text": "x" * 2**20}).encode()
    with pytest.raises(ControlDataError, match=r"metadata.jsonl', line 2: longer than 1,048,576 bytes"):
        ControlDataset(_linked_rows(dataset, tmp_path / "huge", [first, huge]), pipe.tokenizer, 64)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "bomb.png").write_bytes(png_header(20000, 20000))
    Image.new("1", (10000, 7000)).save(tmp_path / "bad" / "wide.png")
    lines = [
        first,
        json.dumps({**row, "text": "a red circle " * 400}).encode(),
        b'["images/x.png", "conditions/x.png", "a caption"]',
        json.dumps({**row, "image": "bad/bomb.png"}).encode(),
        json.dumps({**row, "conditioning_image": "bad/wide.png"}).encode(),
        third,
    ]
    folder = _linked_rows(dataset, tmp_path / "rows", lines)
    os.symlink(tmp_path / "bad", folder / "bad")
    with pytest.raises(ControlDataError) as err:
        ControlDataset(folder, pipe.tokenizer, 64)
    message = str(err.value)
    assert message.startswith("4 bad row(s) in"), message
    assert "line 2: the caption 'text' is 5,200 characters long, over the limit of 4,096" in message
    assert "line 3: not a JSON object" in message
    assert "line 4: bad/bomb.png: 400,000,000 pixels is too large" in message
    assert "line 5: bad/wide.png: 10000×7000 pixels is too large" in message


def test_a_metadata_file_that_is_not_a_regular_file_is_refused_unread(pipe, tmp_path):
    (tmp_path / "folder" / "metadata.jsonl").mkdir(parents=True)
    with pytest.raises(ControlDataError, match=r"metadata file '.*metadata.jsonl' is a folder, not a text file"):
        ControlDataset(tmp_path / "folder", pipe.tokenizer, 64)
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "metadata.jsonl").symlink_to("/dev/zero")
    with pytest.raises(ControlDataError, match=r"metadata file '.*metadata.jsonl' is a device, not a text file"):
        ControlDataset(tmp_path / "zero", pipe.tokenizer, 64)


def _trained_like(pipe):
    """Put a control model with non-trivial weights on ``pipe``'s UNet (as training would) and return it."""
    torch.manual_seed(0)
    encoder = ConditionEncoder(ConditionEncoderConfig.for_model(pipe.unet, pipe.vae_scale_factor))
    torch.nn.init.normal_(encoder.conv_out.weight, std=0.05)
    inject(pipe.unet, EtherConfig(method="ether_plus", target_modules=list(TARGET_PRESETS["unet-attention-ff"])), "c")
    with torch.no_grad():
        for p in pipe.unet.parameters():
            if p.requires_grad and p.ndim == 2 and p.shape[0] == 1:
                p.add_(0.05 * torch.randn_like(p))
    return encoder


def test_save_load_round_trip_and_both_guidance_branches(pipe, dataset, tmp_path):
    control = Image.open(dataset / "conditions" / "10000001.png")
    prompt = "a small red dotted square at top left"
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np")
    base = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    encoder = _trained_like(pipe)
    path = save_control_weights(tmp_path, pipe.unet, encoder, "c", base_model="tiny-sd")
    from ether_diffusion.inject import delete_adapter

    delete_adapter(pipe.unet, "c")
    assert path.name == "ether_control.safetensors"

    fresh = EtherControlPipeline.from_pretrained(str(default_model_path()), safety_checker=None)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_control_weights(path)
    seen = []
    handle = fresh.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    plain = fresh.unet.conv_in(torch.zeros(1, 4, 16, 16))
    handle.remove()
    assert seen == [1] and plain.shape[0] == 1
    captured = []
    handle = fresh.unet.register_forward_hook(lambda m, i, o: captured.append(i[0].shape[0]))
    out = fresh(prompt, image=control, generator=torch.Generator().manual_seed(0), **kwargs).images
    handle.remove()
    assert captured and all(n == 2 for n in captured)  # both branches in one batch, the control added to both
    assert np.abs(out - base).max() > 0.01
    with pytest.raises(ValueError, match="pass image="):
        fresh(prompt, **kwargs)
    with pytest.raises(ControlDataError, match="32×32"):
        fresh(prompt, image=control.resize((32, 32)), **kwargs)
    fresh.unload_control_weights()
    again = fresh(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(again, base, atol=1e-5)


def test_wrong_files_are_refused_and_nothing_changes(pipe, tmp_path):
    from ether_diffusion.io import save_adapter
    from ether_diffusion.pipeline import load_ether_weights

    encoder = _trained_like(pipe)
    control_file = save_control_weights(tmp_path / "control.safetensors", pipe.unet, encoder, "c")
    plain_file = save_adapter(tmp_path / "plain.safetensors", {"unet": pipe.unet}, "c")
    wide = ConditionEncoder(ConditionEncoderConfig())  # an SD-1.5 encoder: 320 channels, ×8
    other_file = save_control_weights(tmp_path / "sd15.safetensors", pipe.unet, wide, "c")
    from ether_diffusion.inject import delete_adapter

    delete_adapter(pipe.unet, "c")
    fresh = EtherControlPipeline.from_pretrained(str(default_model_path()), safety_checker=None)
    with pytest.raises(AdapterFileError, match="no condition encoder"):
        fresh.load_control_weights(plain_file)
    with pytest.raises(ConditionMismatchError, match="320 channels"):
        fresh.load_control_weights(other_file)
    with pytest.raises(AdapterMismatchError, match="load_control_weights"):
        load_ether_weights(fresh, control_file)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(control_file.read_bytes()[:-100])
    with pytest.raises(AdapterFileError, match="truncated, corrupt"):
        fresh.load_control_weights(corrupt)
    assert fresh.condition_encoder is None and fresh.get_list_ether_adapters() == {}
    # finite in the file's float32, inf in a float16 pipeline: refused before anything is loaded
    with torch.no_grad():
        loud = _trained_like(pipe)
        loud.conv_in.weight[0, 0, 0, 0] = 1e5
    loud_file = save_control_weights(tmp_path / "loud.safetensors", pipe.unet, loud, "c")
    delete_adapter(pipe.unet, "c")
    half = EtherControlPipeline.from_pretrained(str(default_model_path()), safety_checker=None).to(torch.float16)
    with pytest.raises(AdapterFileError, match=r"conv_in.weight do not fit in this pipeline's torch.float16"):
        half.load_control_weights(loud_file)
    assert half.condition_encoder is None and half.get_list_ether_adapters() == {}
    fresh.load_control_weights(control_file)  # still loads after the failures
    with pytest.raises(ValueError, match="already has a control model"):
        fresh.load_control_weights(control_file)


def _config(dataset, out, **changes) -> ControlConfig:
    fields = dict(train_data_dir=str(dataset), output_dir=str(out), train_batch_size=2, report_to="none", quiet=True,
                  learning_rate=1e-2, encoder_learning_rate=1e-3)  # fmt: skip
    return ControlConfig(**{**fields, **changes})


def _flags(dataset, out, *extra):
    return registry.parse_args(TaskKind.CONTROL, ["--train_data_dir", str(dataset), "--output_dir", str(out), *extra])


@pytest.mark.slow
def test_script_trains_checkpoints_and_resumes_to_the_same_model(dataset, tmp_path):
    common = dict(max_train_steps=4, checkpointing_steps=2, proportion_empty_prompts=0.5)
    straight = train(_config(
        dataset, tmp_path / "straight", **common, validation_image=[str(dataset / "conditions" / "10000000.png")],
        validation_prompt=["a small green solid square at top right on a black background"], validation_steps=2,
        validation_inference_steps=2, num_validation_images=1,
    ))  # fmt: skip
    assert straight.global_step == 4 and straight.trainable_parameters > 0
    assert (tmp_path / "straight" / "samples.png").is_file()  # the reload round trip
    assert [p.name for p in straight.validation_images] == ["step-000000.png", "step-000002.png", "step-000004.png"]
    interrupted = tmp_path / "interrupted"
    interrupted.mkdir()
    os.system(f"cp -r {tmp_path / 'straight' / 'checkpoint-2'} {interrupted}")
    resumed = train(_config(dataset, interrupted, **common, resume_from_checkpoint="latest"))
    assert resumed.losses == straight.losses[2:]
    from ether_diffusion.io import read_adapter_file

    a, b = read_adapter_file(straight.adapter_path), read_adapter_file(resumed.adapter_path)
    assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    ea, eb = a.modules["condition_encoder"]["state"], b.modules["condition_encoder"]["state"]
    assert all(torch.equal(ea[k], eb[k]) for k in ea) and ea["conv_out.weight"].abs().sum() > 0


@pytest.mark.slow
def test_encoder_only_baseline_trains_no_adapter(dataset, tmp_path):
    result = train(_config(dataset, tmp_path, max_train_steps=1, no_adapters=True))
    from ether_diffusion.io import read_adapter_file

    source = read_adapter_file(result.adapter_path)
    assert source.configs == {} and result.trainable_parameters == sum(
        v.numel() for v in source.modules["condition_encoder"]["state"].values()
    )


def test_bad_flags_are_refused(dataset, tmp_path):
    with pytest.raises(SystemExit):
        _flags(dataset, tmp_path, "--validation_prompt", "a circle")  # no --validation_image
    with pytest.raises(SystemExit):
        _flags(dataset, tmp_path, "--validation_prompt", "a", "--validation_image", str(tmp_path / "missing.png"))
    for flag, value in (("--train_batch_size", "0"), ("--encoder_learning_rate", "0"), ("--n_blocks", "0")):
        with pytest.raises(SystemExit):
            _flags(dataset, tmp_path, flag, value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(_config(tmp_path / "nowhere", tmp_path / "out", max_train_steps=1))


def test_inspect_shows_the_encoder(pipe, tmp_path, capsys):
    from ether_diffusion.cli import main
    from ether_diffusion.inject import delete_adapter

    encoder = _trained_like(pipe)
    path = save_control_weights(tmp_path, pipe.unet, encoder, "c")
    delete_adapter(pipe.unet, "c")
    assert main(["inspect", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["modules"]["condition_encoder"]["parameters"] == sum(p.numel() for p in encoder.parameters())
    assert summary["components"]["unet"]["config"]["method"] == "ether_plus" and summary["extra"]["task"] == "control"


def test_edges_task_writes_edge_controls(tmp_path):
    folder = write_world_control_dataset(tmp_path, "edges", 2, start=10_000_000)
    control = np.asarray(Image.open(folder / "conditions" / "10000000.png"))
    assert control.shape == (64, 64, 3) and set(np.unique(control)) == {0, 255}
    with pytest.raises(ValueError, match="task must be one of"):
        write_world_control_dataset(tmp_path, "depth", 1)


@pytest.mark.slow
def test_two_processes_train_one_control_model(dataset, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port, launch_env

    from ether_diffusion.io import read_adapter_file

    launcher = Path(sys.executable).parent / "accelerate"
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_control_ether.py"
    command = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    command += [str(script), "--train_data_dir", str(dataset), "--max_train_steps", "2", "--train_batch_size", "2"]
    command += ["--output_dir", str(tmp_path), "--report_to", "none", "--quiet"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=launch_env())
    assert run.returncode == 0, run.stderr[-3000:]
    source = read_adapter_file(tmp_path / "ether_control.safetensors")
    assert source.extra["num_processes"] == "2" and source.extra["steps"] == "2"
    assert "condition_encoder" in source.modules and "unet" in source.configs
