"""ETHER beside diffusers' saving and PEFT LoRAs: save_pretrained writes plain weights, LoRA + ETHER in both orders."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_adapters
from safetensors.torch import load_file

from ether_diffusion import EtherConfig, inject, save_adapter
from ether_diffusion.inject import adapter_layers, delete_adapter
from ether_diffusion.pipeline import (
    disable_ether,
    enable_ether,
    fuse_ether,
    get_active_ether_adapters,
    load_ether_weights,
    unfuse_ether,
    unload_ether_weights,
)

pytestmark = pytest.mark.slow  # stock diffusers pipelines with PEFT LoRAs beside ETHER: the end-to-end tier

TINY_SD = Path(__file__).resolve().parents[1] / "assets" / "tiny-sd"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_in", "proj_out"]


def load_stock(path=TINY_SD):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe):
    return pipe(
        ["a red star"], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def saved_tensors(folder):
    return {
        **{f"unet.{k}": v for k, v in load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")).items()},
        **{f"text_encoder.{k}": v for k, v in load_file(str(folder / "text_encoder" / "model.safetensors")).items()},
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A subject ETHER+ adapter (UNet linears, GEGLU, 1×1 convs; ETHER on the text encoder) and a style PEFT LoRA
    saved by diffusers itself, overlapping on to_q/to_v/to_out/proj_in and q_proj/out_proj."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    folder = tmp_path_factory.mktemp("coexist")
    pipe = load_stock()
    inject(pipe.unet, EtherConfig(method="ether_plus", n_blocks=2, target_modules=UNET_TARGETS), "tmp")
    inject(pipe.text_encoder, EtherConfig(method="ether", target_modules="text-encoder-attention"), "tmp")
    randomize_adapters(pipe.unet, seed=1)
    randomize_adapters(pipe.text_encoder, seed=2)
    subject = save_adapter(
        folder / "subject.safetensors", {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "tmp"
    )
    delete_adapter(pipe.unet, "tmp")
    delete_adapter(pipe.text_encoder, "tmp")

    inject_adapter_in_model(
        LoraConfig(r=4, target_modules=["to_q", "to_v", "to_out.0", "proj_in", "ff.net.2"]), pipe.unet
    )
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj", "out_proj"]), pipe.text_encoder)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    StableDiffusionPipeline.save_lora_weights(
        folder / "style",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
    )
    return subject, folder / "style"


@pytest.fixture(scope="module")
def references(files):
    """Images of: the LoRA alone, ETHER alone, and both (the LoRA fused into the weights, then ETHER on top)."""
    subject, style = files
    pipe = load_stock()
    base = generate(pipe)
    pipe.load_lora_weights(style)
    lora_only = generate(pipe)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # plain layers holding W + ΔW
    load_ether_weights(pipe, subject, "subject")
    both = generate(pipe)
    pipe = load_stock()
    load_ether_weights(pipe, subject, "subject")
    ether_only = generate(pipe)
    for a, b in ((both, lora_only), (both, ether_only), (lora_only, base), (ether_only, base)):
        assert np.abs(a - b).max() > 0.1  # four different models
    return {"base": base, "lora": lora_only, "ether": ether_only, "both": both}


def close(pipe, reference):
    return np.abs(generate(pipe) - reference).max() <= 1e-4


# --- saving ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["unfused", "fused", "disabled"])
def test_save_pretrained_writes_plain_weights_as_the_pipeline_computes(state, files, references, tmp_path):
    subject, _ = files
    pipe = load_stock()
    base_weights = {**{f"unet.{k}": v for k, v in snapshot(pipe.unet).items()}}
    load_ether_weights(pipe, subject, "subject")
    {"unfused": lambda: None, "fused": lambda: fuse_ether(pipe), "disabled": lambda: disable_ether(pipe)}[state]()
    before = generate(pipe)
    live = {**snapshot(pipe.unet), **{f"te.{k}": v for k, v in snapshot(pipe.text_encoder).items()}}

    pipe.save_pretrained(tmp_path / "saved")

    saved = saved_tensors(tmp_path / "saved")
    stock = saved_tensors(TINY_SD)
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in stock.items()}  # original names only
    if state == "fused":  # the fused weights, exactly
        for path, layer in adapter_layers(pipe.unet):
            torch.testing.assert_close(saved[f"unet.{path}.weight"], layer.base_layer.weight, rtol=0, atol=0)
    if state == "disabled":  # the base model, exactly
        for key, value in base_weights.items():
            torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
    reloaded = load_stock(tmp_path / "saved")
    assert close(reloaded, references["base"] if state == "disabled" else references["ether"])

    # the live pipeline is untouched: same adapters, same state, same weights, same images
    assert get_active_ether_adapters(pipe) == ["subject"]
    now = {**snapshot(pipe.unet), **{f"te.{k}": v for k, v in snapshot(pipe.text_encoder).items()}}
    assert now.keys() == live.keys() and all(torch.equal(now[k], live[k]) for k in live)
    assert np.array_equal(generate(pipe), before)


def test_guard_follows_copies_and_leaves_with_the_adapters(files, tmp_path):
    import copy

    subject, _ = files
    pipe = load_stock()
    load_ether_weights(pipe, subject, "subject")
    assert "save_pretrained" in vars(pipe.unet) and "load_adapter" in vars(pipe.text_encoder)
    twin = copy.deepcopy(pipe.unet)  # the guard is bound to the copy, not to the original
    fuse_ether(pipe)  # the original changes; the copy must save its own (unfused, adapted-as-computed) weights
    twin.save_pretrained(tmp_path / "twin")
    saved = load_file(str(tmp_path / "twin" / "diffusion_pytorch_model.safetensors"))
    assert not [k for k in saved if "base_layer" in k or "ether" in k]
    for path, layer in adapter_layers(pipe.unet):  # fused original == the copy's adapted weights (float64 fold)
        torch.testing.assert_close(saved[f"{path}.weight"], layer.base_layer.weight, rtol=0, atol=1e-5)
    unload_ether_weights(pipe)
    assert not {"save_pretrained", "load_lora_adapter", "add_adapter"} & set(vars(pipe.unet))
    assert not {"save_pretrained", "load_adapter", "add_adapter"} & set(vars(pipe.text_encoder))


# --- PEFT LoRA and ETHER on one pipeline ------------------------------------------------------------------------

STEPS = [
    ("fuse_lora", lambda pipe: pipe.fuse_lora()),
    ("fuse_ether", fuse_ether),
    ("unfuse_lora", lambda pipe: pipe.unfuse_lora()),
    ("unfuse_ether", unfuse_ether),
    ("fuse_ether", fuse_ether),
    ("fuse_lora", lambda pipe: pipe.fuse_lora()),
    ("unfuse_ether", unfuse_ether),
    ("unfuse_lora", lambda pipe: pipe.unfuse_lora()),
]


@pytest.mark.parametrize("order", ["lora-then-ether", "ether-then-lora", "fused-ether-then-lora"])
def test_lora_and_ether_in_either_order(order, files, references):
    subject, style = files
    pipe = load_stock()
    weights = snapshot(pipe.unet)
    if order == "lora-then-ether":
        pipe.load_lora_weights(style, adapter_name="style")
        load_ether_weights(pipe, subject, "subject")
    else:
        load_ether_weights(pipe, subject, "subject")
        if order == "fused-ether-then-lora":
            fuse_ether(pipe)
        pipe.load_lora_weights(style, adapter_name="style")
    assert close(pipe, references["both"])  # ETHER(W + ΔW_LoRA) whichever came first, fused or not
    if order == "fused-ether-then-lora":
        unfuse_ether(pipe)
        assert close(pipe, references["both"])

    for name, step in STEPS:  # fusing or unfusing either one never changes what the pipeline computes
        step(pipe)
        assert close(pipe, references["both"]), name
    plain = {k.replace(".base_layer", ""): v for k, v in snapshot(pipe.unet).items() if "lora_" not in k}
    for key, value in weights.items():  # all unfused again: the original weights
        torch.testing.assert_close(plain[key], value, rtol=0, atol=1e-6)

    pipe.disable_lora()
    assert close(pipe, references["ether"])
    pipe.enable_lora()
    disable_ether(pipe)
    assert close(pipe, references["lora"])
    enable_ether(pipe)


@pytest.mark.parametrize("fused", [False, True])
def test_unloading_one_keeps_the_other(fused, files, references):
    subject, style = files
    pipe = load_stock()
    pipe.load_lora_weights(style, adapter_name="style")
    load_ether_weights(pipe, subject, "subject")
    pipe.unload_lora_weights()  # diffusers removes its PEFT layers; the ETHER wrappers stay
    assert get_active_ether_adapters(pipe) == ["subject"]
    assert close(pipe, references["ether"])

    pipe.load_lora_weights(style, adapter_name="style")  # ETHER already there: PEFT still loads
    if fused:
        fuse_ether(pipe)
    unload_ether_weights(pipe)  # fused ETHER stays folded in on top of the LoRA, unfused ETHER leaves
    assert not list(adapter_layers(pipe.unet))
    assert close(pipe, references["both"] if fused else references["lora"])


def test_saving_refuses_unfused_ether_on_top_of_a_lora(files, tmp_path):
    subject, style = files
    pipe = load_stock()
    pipe.load_lora_weights(style, adapter_name="style")
    load_ether_weights(pipe, subject, "subject")
    with pytest.raises(RuntimeError, match=r"on top of another adapter.*fuse_ether"):
        pipe.unet.save_pretrained(tmp_path / "unet")
    assert not (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
