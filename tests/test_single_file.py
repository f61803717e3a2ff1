"""Single-file checkpoints: loading them offline and safely, and writing a fused model in the original layout."""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import randomize_adapters
from safetensors import safe_open
from safetensors.torch import save_file

from ether_diffusion import EtherConfig, inject, save_adapter
from ether_diffusion.finite import NonFiniteError
from ether_diffusion.inject import delete_adapter
from ether_diffusion.models import (
    ConfigNotFoundError,
    ModelLoadError,
    UnsafeCheckpointError,
    load_pipeline,
    original_state_dict,
    save_single_file,
)
from ether_diffusion.pipeline import fuse_ether, load_ether_weights, unload_ether_weights

TINY_SD = Path(__file__).resolve().parents[1] / "assets" / "tiny-sd"
CLI = str(Path(sys.executable).parent / "ether-diffusion")
COMPONENTS = ("unet", "vae", "text_encoder")


def generate(pipe):
    generator = torch.Generator().manual_seed(0)
    return pipe(["a red star"], num_inference_steps=3, generator=generator, output_type="np").images


def assert_same_weights(a, b):
    for name in COMPONENTS:
        first, second = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert first.keys() == second.keys(), name
        for key in first:
            assert torch.equal(first[key], second[key]), f"{name}.{key}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The shipped tiny model as one original-layout .safetensors."""
    return save_single_file(load_pipeline(TINY_SD), tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    pipe = load_pipeline(TINY_SD)
    inject(pipe.unet, EtherConfig(method="ether_plus", n_blocks=2, target_modules="unet-attention-ff"), "tmp")
    inject(pipe.text_encoder, EtherConfig(method="ether", target_modules="text-encoder-attention"), "tmp")
    randomize_adapters(pipe.unet)
    randomize_adapters(pipe.text_encoder, seed=2)
    path = save_adapter(
        tmp_path_factory.mktemp("a") / "a.safetensors", {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "tmp"
    )
    delete_adapter(pipe.unet, "tmp")
    delete_adapter(pipe.text_encoder, "tmp")
    return path


@pytest.mark.slow  # a subprocess or a full-size model: the end-to-end tier
def test_fused_single_file_loads_back_with_every_weight_equal(adapter, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = subprocess.run(
        [
            CLI,
            "fuse",
            "--adapter",
            str(adapter),
            "--model",
            str(TINY_SD),
            "--single_file",
            str(tmp_path / "m.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    fused = load_pipeline(TINY_SD)
    load_ether_weights(fused, adapter)
    fuse_ether(fused)
    unload_ether_weights(fused)  # the fused diffusers model

    # stock diffusers, offline: the config comes from a local folder
    back = StableDiffusionPipeline.from_single_file(str(tmp_path / "m.safetensors"), config=str(TINY_SD))
    assert_same_weights(back, fused)

    with safe_open(str(tmp_path / "m.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    for key in (  # the original CompVis layout that A1111/ComfyUI read
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",  # up level 0: no attention, upsampler at .1
        "first_stage_model.decoder.up.0.block.0.conv1.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in keys, key


def test_fused_weights_beyond_the_dtype_are_never_written(adapter, tmp_path, capsys):
    """ETHER+ at strength 100000 fuses attention weights of 1e8: finite in float32, infinite in float16."""
    from ether_diffusion.cli import main

    target = tmp_path / "m.safetensors"
    target.write_bytes(b"a good checkpoint")
    argv = ["fuse", "--adapter", f"{adapter}:100000", "--single_file", str(target), "--dtype", "fp16", "--overwrite"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the weight model.diffusion_model.input_blocks.1.1.") and "Traceback" not in err
    assert "holds values beyond fp16's range (max 65504; largest magnitude" in err and "--dtype fp32" in err
    assert target.read_bytes() == b"a good checkpoint" and os.listdir(tmp_path) == ["m.safetensors"]


def test_a_full_disk_while_fusing_is_one_line_and_keeps_the_old_checkpoint(adapter, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    from ether_diffusion.cli import main

    def disk_full(tensors, filename, metadata=None):  # safetensors: its own partial temporary, then its error
        (Path(filename).parent / ".tmpAbC123").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    target = tmp_path / "m.safetensors"
    target.write_bytes(b"a good checkpoint")
    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    assert main(["fuse", "--adapter", str(adapter), "--single_file", str(target), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: could not write the checkpoint to '{target}': the disk is full (No space left on")
    assert err.endswith("the file that was there is unchanged. Free some space or write elsewhere, then run again")
    assert target.read_bytes() == b"a good checkpoint" and os.listdir(tmp_path) == ["m.safetensors"]


def test_layout_matches_diffusers_conversion_for_the_real_sd15():
    """On the SD-1.5 architecture (built on the meta device), diffusers' own LDM → diffusers conversion maps every
    written key back to the diffusers name and shape it came from."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        infer_diffusers_model_type,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        pipe = SimpleNamespace(
            unet=UNet2DConditionModel(cross_attention_dim=768),
            vae=AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2,
            ),
            text_encoder=CLIPTextModel(CLIPTextConfig()),  # the SD-1.5 (ViT-L/14) text encoder's config
        )
    state = original_state_dict(pipe)
    assert infer_diffusers_model_type(state) == "v1"
    for name, convert in (("unet", convert_ldm_unet_checkpoint), ("vae", convert_ldm_vae_checkpoint)):
        model = getattr(pipe, name)
        back = convert(state, dict(model.config))
        assert {k: tuple(v.shape) for k, v in back.items()} == {
            k: tuple(v.shape) for k, v in model.state_dict().items()
        }, name


def test_single_file_holds_unfused_adapters_as_computed(adapter, tmp_path):
    pipe = load_pipeline(TINY_SD)
    pipe.set_progress_bar_config(disable=True)
    load_ether_weights(pipe, adapter)
    adapted = generate(pipe)
    save_single_file(pipe, tmp_path / "m.safetensors")  # the wrappers write what they compute
    back = load_pipeline(tmp_path / "m.safetensors", config=TINY_SD)
    back.set_progress_bar_config(disable=True)
    assert np.abs(generate(back) - adapted).max() <= 1e-4


def test_ckpt_loads_and_a_malicious_one_runs_nothing(tmp_path):
    pipe = load_pipeline(TINY_SD)
    torch.save({"state_dict": original_state_dict(pipe), "global_step": 7}, tmp_path / "m.ckpt")
    assert_same_weights(load_pipeline(tmp_path / "m.ckpt", config=TINY_SD), pipe)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"x": torch.zeros(1)}, "callback": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match="could run code"):
        load_pipeline(tmp_path / "evil.ckpt", config=TINY_SD)
    assert not marker.exists()


def test_bad_single_file_arguments(tmp_path):
    with pytest.raises(ModelLoadError, match="no checkpoint file"):
        load_pipeline(tmp_path / "missing.safetensors", config=TINY_SD)
    save_single_file(load_pipeline(TINY_SD), tmp_path / "m.safetensors")
    with pytest.raises(ModelLoadError, match="not a diffusers folder"):
        load_pipeline(tmp_path / "m.safetensors", config=tmp_path)
    with pytest.raises(ModelLoadError, match="drop them"):
        load_pipeline(TINY_SD, config=TINY_SD)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="not a readable PyTorch checkpoint"):
        load_pipeline(tmp_path / "junk.ckpt", config=TINY_SD)
    with pytest.raises(ValueError, match="Stable Diffusion 1.x layout.*SD 2.x-style"):
        with torch.device("meta"):
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel(use_linear_projection=True, cross_attention_dim=1024)
        save_single_file(
            SimpleNamespace(unet=unet, vae=object(), text_encoder=pipe_text_encoder()), tmp_path / "x.safetensors"
        )
    assert not (tmp_path / "x.safetensors").exists()


def kohya_lora(path):
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(1, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 1)}, str(path),
              metadata={"ss_network_module": "networks.lora"})  # fmt: skip


def not_models(tmp_path, adapter):
    """Files people pass as --model that are not Stable Diffusion checkpoints, each with what the error says."""
    cases = {"adapter.safetensors": "is an ETHER adapter file, not a model checkpoint: pass it as an adapter"}
    (tmp_path / "adapter.safetensors").write_bytes(Path(adapter).read_bytes())
    kohya_lora(tmp_path / "lora.safetensors")
    cases["lora.safetensors"] = "is a LoRA file, not a model checkpoint: pass the base model as --model"
    save_file({"unet.to_q.lora_A.weight": torch.zeros(1, 4)}, str(tmp_path / "peft.safetensors"))
    cases["peft.safetensors"] = "is a LoRA file"
    torch.save({"state_dict": {"x": torch.zeros(2)}}, tmp_path / "tensors.ckpt")
    cases["tensors.ckpt"] = r"holds no Stable Diffusion weights \(no model\.diffusion_model\.\* keys among its 1 "
    save_file({"first_stage_model.x": torch.zeros(2)}, str(tmp_path / "vae.safetensors"))
    cases["vae.safetensors"] = r"holds no Stable Diffusion weights .*such as 'first_stage_model.x'"
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    cases["list.pt"] = "holds a list, not a state dict of model weights"
    (tmp_path / "text.ckpt").write_text("<html>404 Not Found</html>")
    cases["text.ckpt"] = r"is not a readable PyTorch checkpoint: it starts with b'<html>404 Not Fo', not the zip"
    (tmp_path / "empty.ckpt").write_bytes(b"")
    cases["empty.ckpt"] = "is not a readable PyTorch checkpoint: it is empty"
    (tmp_path / "plain.ckpt").write_bytes(pickle.dumps({"a": [1, 2]}, protocol=4))  # torch.save's are protocol 2
    cases["plain.ckpt"] = r"is not a readable PyTorch checkpoint \(Unsupported operand 149\); check the file$"
    (tmp_path / "zip.ckpt").write_bytes(b"PK\x03\x04 and then garbage")
    cases["zip.ckpt"] = r"is not a readable PyTorch checkpoint \(RuntimeError: PytorchStreamReader failed"
    (tmp_path / "broken.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{broken")
    cases["broken.safetensors"] = "is not a readable safetensors file: it is truncated, corrupt or of another format"
    assert sorted(cases) == sorted(NOT_MODELS)
    return cases


NOT_MODELS = ["adapter.safetensors", "lora.safetensors", "peft.safetensors", "tensors.ckpt", "vae.safetensors",
              "list.pt", "text.ckpt", "empty.ckpt", "plain.ckpt", "zip.ckpt", "broken.safetensors"]  # fmt: skip


@pytest.mark.parametrize("name", NOT_MODELS)
def test_files_that_are_not_models_are_named_and_nothing_is_loaded(adapter, tmp_path, monkeypatch, name):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never reach out, even with a network
    message = not_models(tmp_path, adapter)[name]
    for config in (TINY_SD, None):  # without --config too: the file is refused before diffusers asks the Hub
        with pytest.raises(ModelLoadError) as err:
            load_pipeline(tmp_path / name, config=config)
        text = str(err.value)
        assert re.search(rf"^'{re.escape(str(tmp_path / name))}' {message}", text), text
        assert "\n" not in text and "weights_only" not in text  # torch's advice to unpickle code is not relayed


def test_a_whole_pipeline_is_needed_and_the_original_config_must_be_one(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    unet_only = {k: v for k, v in load_file(str(checkpoint)).items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, str(tmp_path / "unet.safetensors"))
    with pytest.raises(ModelLoadError, match=r"does not hold a whole StableDiffusionPipeline \(Failed to load CLIP"):
        load_pipeline(tmp_path / "unet.safetensors", config=TINY_SD)
    for text, message in (
        (": : [ not yaml", r"its YAML does not parse \(.* at line 1\); pass the .yaml the checkpoint came with"),
        ("- a list\n", "it has no model: params: section"),
        ("model: a string\n", "it has no model: params: section"),
        ("model:\n  params:\n    unet_config: {}\n", "model.params has no first_stage_config"),
    ):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ModelLoadError, match=rf"^'{re.escape(str(tmp_path / 'bad.yaml'))}' is not an .*{message}"):
            load_pipeline(checkpoint, original_config=tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("model:\n  params:\n    unet_config: {}\n    first_stage_config: {}\n")
    with pytest.raises(ModelLoadError, match=r"does not describe the model of .*\(diffusers' conversion failed: "):
        load_pipeline(checkpoint, original_config=tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_bytes(b"\x90\x00binary")
    with pytest.raises(ModelLoadError, match="cannot read the original config .*codec can't decode"):
        load_pipeline(checkpoint, original_config=tmp_path / "bad.yaml")


def test_a_checkpoint_of_infinite_weights_is_refused_not_sampled_black(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(checkpoint))
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    state[key] = torch.full_like(state[key], float("inf"))
    save_file(state, str(tmp_path / "inf.safetensors"))
    message = rf"^the weight unet\.\S+\.to_q\.weight holds values beyond .*: '{re.escape(str(tmp_path))}/inf"
    with pytest.raises(NonFiniteError, match=message + r"\.safetensors' is damaged; use a good copy of the model$"):
        load_pipeline(tmp_path / "inf.safetensors", config=TINY_SD)


@pytest.mark.parametrize("verb", ["sample", "export", "fuse"])
def test_the_cli_names_a_file_that_is_not_a_model(adapter, tmp_path, capsys, verb):
    from ether_diffusion.cli import main

    model = ["--model", str(adapter), "--config", str(TINY_SD)]
    argv = {
        "sample": ["sample", *model, "--prompt", "x", "--output_dir", str(tmp_path / "s")],
        "export": ["export", str(adapter), *model, "--format", "kohya", "--output", str(tmp_path / "x.safetensors")],
        "fuse": ["fuse", "--adapter", str(adapter), *model, "--single_file", str(tmp_path / "x.safetensors")],
    }[verb]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after any warning the first import of diffusers prints
    assert err == f"error: '{adapter}' is an ETHER adapter file, not a model checkpoint: pass it as an adapter " \
        "(load_ether_weights in Python) and the base model it was made for as --model"  # fmt: skip
    assert not (tmp_path / "x.safetensors").exists()


def pipe_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig())


@pytest.mark.slow  # a subprocess or a full-size model: the end-to-end tier
def test_cli_single_file_model_offline(tmp_path):
    """Without a config and without the Hub: one error that says what to pass; with --config it samples."""
    save_single_file(load_pipeline(TINY_SD), tmp_path / "m.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # no network, empty cache
    args = [CLI, "sample", "--model", str(tmp_path / "m.safetensors"), "--prompt", "a red star", "--steps", "2"]
    failed = subprocess.run([*args, "--output_dir", str(tmp_path / "s")], capture_output=True, text=True, env=env)
    assert failed.returncode == 2
    assert "single-file checkpoint" in failed.stderr and "--config FOLDER" in failed.stderr
    worked = subprocess.run(
        [*args, "--config", str(TINY_SD), "--output_dir", str(tmp_path / "s")], capture_output=True, text=True, env=env
    )
    assert worked.returncode == 0, worked.stderr
    assert len(list((tmp_path / "s").glob("*.png"))) == 1


def test_config_not_found_is_one_clear_error(tmp_path, monkeypatch):
    save_single_file(load_pipeline(TINY_SD), tmp_path / "m.safetensors")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never reach out, even with a network
    with pytest.raises(ConfigNotFoundError, match="--config FOLDER"):
        load_pipeline(tmp_path / "m.safetensors")


def test_training_scripts_and_the_studio_take_a_single_file_model(tmp_path):
    """DreamBooth, control and the studio train on one .safetensors checkpoint (offline with --config), and the
    reload round trip at the end loads the base model from the same file."""
    from ether_diffusion.assets import default_subjects_path
    from ether_diffusion.io import read_adapter_file
    from ether_diffusion.registry import train
    from ether_diffusion.studio import JobManager, Sampler, SampleRequest, TrainSpec, Workspace
    from ether_diffusion.training.dreambooth import DreamBoothConfig

    checkpoint = save_single_file(load_pipeline(TINY_SD), tmp_path / "tiny.safetensors")
    subject = default_subjects_path() / "orange_checkered_star"
    config = DreamBoothConfig.from_args(
        ["--pretrained_model_name_or_path", str(checkpoint), "--config", str(TINY_SD),
         "--instance_data_dir", str(subject), "--instance_prompt", "a sks star", "--output_dir", str(tmp_path / "db"),
         "--max_train_steps", "1", "--validation_prompt", "a sks star", "--num_validation_images", "1",
         "--validation_inference_steps", "2", "--report_to", "none", "--quiet"]
    )  # fmt: skip
    assert config.model_config == str(TINY_SD)
    result = train(config)
    assert read_adapter_file(result.adapter_path).base_model == str(checkpoint)
    assert (tmp_path / "db" / "samples.png").is_file()  # the saved file reloaded onto the single-file model

    workspace = Workspace(tmp_path / "studio")
    jobs = JobManager(workspace, checkpoint, model_config=str(TINY_SD))
    jobs.start(TrainSpec(adapter_name="one", instance_prompt="a sks star", subject="orange_checkered_star",
                         prior_preservation=False, max_train_steps=1, preview_every=5, preview_steps=2))  # fmt: skip
    state = jobs.wait(120)
    assert state["phase"] == "done", state.get("traceback")
    sampler = Sampler(checkpoint, workspace, model_config=str(TINY_SD))
    out = sampler.sample(SampleRequest("a sks star", [("one", 1.0)], seeds=[0], steps=2), save=False)
    assert len(out.images) == 2
