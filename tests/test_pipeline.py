"""Adapters in a real (tiny) StableDiffusionPipeline: load, switch, fuse/unfuse, unload, mixed batches."""

import numpy as np
import pytest
import torch
from conftest import build_tiny_components, randomize_adapters
from torch.testing import assert_close

from ether_diffusion import EtherConfig, inject
from ether_diffusion.finite import NonFiniteError
from ether_diffusion.layers import EtherLayer
from ether_diffusion.pipeline import (
    EtherStableDiffusionPipeline,
    delete_ether_adapters,
    disable_ether,
    enable_ether,
    ether_mixed_batch,
    fuse_ether,
    get_active_ether_adapters,
    get_list_ether_adapters,
    load_ether_weights,
    save_ether_weights,
    set_ether_adapters,
    unfuse_ether,
    unload_ether_weights,
)

PROMPTS = ["a red star", "a blue circle on green", "two dots"]


def make_adapter(pipe, path, seed, text_encoder=True):
    """Train-like: inject, move the vectors, save, remove. Returns the written file."""
    inject(pipe.unet, EtherConfig(method="ether_plus", n_blocks=4), "tmp")
    if text_encoder:
        inject(pipe.text_encoder, EtherConfig(method="ether", target_modules="text-encoder-attention"), "tmp")
    randomize_adapters(pipe.unet, seed=seed)
    randomize_adapters(pipe.text_encoder, seed=seed + 1)
    written = save_ether_weights(path, pipe, adapter_name="tmp")
    delete_ether_adapters(pipe, "tmp")
    return written


def generate(pipe, prompts, latents, **kwargs):
    out = pipe(
        prompts,
        latents=latents,
        num_inference_steps=2,
        guidance_scale=3.0,
        height=16,
        width=16,
        output_type="np",
        **kwargs,
    )
    return out.images


def fixed_latents(n):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def base_weights(model):
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if "ether_" not in k}


def unet_weights(pipe):
    return base_weights(pipe.unet)


def test_load_fuse_unfuse_disable_unload(tiny_pipe, tmp_path):
    path = make_adapter(tiny_pipe, tmp_path / "a.safetensors", seed=1)
    latents = fixed_latents(1)
    base = generate(tiny_pipe, PROMPTS[:1], latents)
    weights = {"unet": unet_weights(tiny_pipe), "text_encoder": base_weights(tiny_pipe.text_encoder)}

    assert load_ether_weights(tiny_pipe, path, adapter_name="subject") == "subject"
    assert get_list_ether_adapters(tiny_pipe) == {"unet": ["subject"], "text_encoder": ["subject"]}
    assert get_active_ether_adapters(tiny_pipe) == ["subject"]
    adapted = generate(tiny_pipe, PROMPTS[:1], latents)
    assert np.abs(adapted - base).max() > 1e-3

    fuse_ether(tiny_pipe, safe_fusing=True)
    np.testing.assert_allclose(generate(tiny_pipe, PROMPTS[:1], latents), adapted, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        disable_ether(tiny_pipe)
    unfuse_ether(tiny_pipe)
    for _ in range(9):  # ten fuse/unfuse cycles: the ETHER text encoder and the ETHER+ UNet come back bit for bit
        fuse_ether(tiny_pipe)
        unfuse_ether(tiny_pipe)
    for component in ("unet", "text_encoder"):
        restored = base_weights(getattr(tiny_pipe, component))
        assert restored.keys() == weights[component].keys()
        assert all(torch.equal(restored[k], weights[component][k]) for k in restored), component

    disable_ether(tiny_pipe)
    np.testing.assert_allclose(generate(tiny_pipe, PROMPTS[:1], latents), base, atol=1e-5)
    enable_ether(tiny_pipe)
    np.testing.assert_allclose(generate(tiny_pipe, PROMPTS[:1], latents), adapted, atol=1e-6)

    set_ether_adapters(tiny_pipe, ["subject"], [0.0])  # strength 0: the base model
    np.testing.assert_allclose(generate(tiny_pipe, PROMPTS[:1], latents), base, atol=1e-5)

    unload_ether_weights(tiny_pipe)
    assert not any(isinstance(m, EtherLayer) for m in tiny_pipe.unet.modules())
    assert not any(isinstance(m, EtherLayer) for m in tiny_pipe.text_encoder.modules())
    np.testing.assert_allclose(generate(tiny_pipe, PROMPTS[:1], latents), base, atol=1e-5)


def test_fuse_then_unload_keeps_the_adapter_baked_in(tiny_pipe, tmp_path):
    path = make_adapter(tiny_pipe, tmp_path / "a.safetensors", seed=1)
    latents = fixed_latents(1)
    load_ether_weights(tiny_pipe, path)
    adapted = generate(tiny_pipe, PROMPTS[:1], latents)
    fuse_ether(tiny_pipe)
    unload_ether_weights(tiny_pipe)
    assert not any(isinstance(m, EtherLayer) for m in tiny_pipe.unet.modules())
    np.testing.assert_allclose(generate(tiny_pipe, PROMPTS[:1], latents), adapted, atol=1e-5)


@pytest.mark.parametrize(
    "dtype, strength, message",
    [
        (torch.float32, 1e30, r"values beyond fp32's range .*at strength 1e\+30: fuse them at a smaller strength$"),
        # merged in float32, overflowing once stored in float16 (inf, and NaN where infinities meet)
        (
            torch.float16,
            1e5,
            r"(NaN|values beyond fp16's range) .*at strength 100000: .*, or load the model in float32$",
        ),
    ],
)
def test_fusing_weights_that_overflow_is_refused_and_changes_nothing(tiny_pipe, tmp_path, dtype, strength, message):
    path = make_adapter(tiny_pipe, tmp_path / "a.safetensors", seed=1, text_encoder=False)
    tiny_pipe.to(dtype=dtype)
    load_ether_weights(tiny_pipe, path, "a")
    set_ether_adapters(tiny_pipe, "a", strength)
    before = unet_weights(tiny_pipe)
    with pytest.raises(NonFiniteError, match=r"^the fused weight unet\.down_blocks\.\S+\.weight holds " + message):
        fuse_ether(tiny_pipe, safe_fusing=True)
    after = unet_weights(tiny_pipe)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(m.merged_adapters for m in tiny_pipe.unet.modules() if isinstance(m, EtherLayer))


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -float("inf")])
def test_a_weight_that_is_not_finite_is_refused(tiny_pipe, tmp_path, weight):
    load_ether_weights(tiny_pipe, make_adapter(tiny_pipe, tmp_path / "a.safetensors", seed=1), "a")
    with pytest.raises(ValueError, match=f"the weight {weight} of adapter 'a' is not a finite number"):
        set_ether_adapters(tiny_pipe, ["a"], [weight])
    layer = next(m for m in tiny_pipe.unet.modules() if isinstance(m, EtherLayer))
    assert layer.strengths == {"a": 1.0}


def test_save_pretrained_refuses_weights_that_overflow(tiny_pipe, tmp_path):
    """An adapted model saves its weights as it computes them; at strength 1e30 they are beyond float32's range."""
    load_ether_weights(tiny_pipe, make_adapter(tiny_pipe, tmp_path / "a.safetensors", seed=1), "a")
    set_ether_adapters(tiny_pipe, "a", 1e30)
    with pytest.raises(NonFiniteError, match=r"^the weight down_blocks\.\S+ holds values beyond fp32's range"):
        tiny_pipe.unet.save_pretrained(tmp_path / "unet")
    assert not (tmp_path / "unet").exists()


def test_two_adapters_switch_combine_delete(tiny_pipe, tmp_path):
    a = make_adapter(tiny_pipe, tmp_path / "a.safetensors", seed=1)
    b = make_adapter(tiny_pipe, tmp_path / "b.safetensors", seed=5, text_encoder=False)
    latents = fixed_latents(1)
    load_ether_weights(tiny_pipe, a, "a")
    out_a = generate(tiny_pipe, PROMPTS[:1], latents)
    load_ether_weights(tiny_pipe, b, "b")
    assert get_active_ether_adapters(tiny_pipe) == ["b"]
    out_b = generate(tiny_pipe, PROMPTS[:1], latents)
    set_ether_adapters(tiny_pipe, ["a", "b"], [1.0, 0.5])
    both = generate(tiny_pipe, PROMPTS[:1], latents)
    assert min(np.abs(both - out_a).max(), np.abs(both - out_b).max()) > 1e-4
    set_ether_adapters(tiny_pipe, "a")
    np.testing.assert_allclose(generate(tiny_pipe, PROMPTS[:1], latents), out_a, atol=1e-6)
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        load_ether_weights(tiny_pipe, a, "a")
    delete_ether_adapters(tiny_pipe, "a")
    assert get_list_ether_adapters(tiny_pipe) == {"unet": ["b"]}
    with pytest.raises(KeyError, match="unknown adapters"):
        set_ether_adapters(tiny_pipe, "a")


@pytest.mark.parametrize("images_per_prompt", [1, 2])
def test_mixed_batch_equals_one_adapter_at_a_time(tmp_path, images_per_prompt):
    components = build_tiny_components(tmp_path)
    pipe = EtherStableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ether_weights(make_adapter(pipe, tmp_path / "a.safetensors", seed=1), "a")
    pipe.load_ether_weights(make_adapter(pipe, tmp_path / "b.safetensors", seed=7, text_encoder=False), "b")
    assignment = ["b", None, "a"]
    latents = fixed_latents(len(PROMPTS) * images_per_prompt)

    expected = []
    for i, (prompt, name) in enumerate(zip(PROMPTS, assignment)):
        if name is None:
            pipe.disable_ether()
        else:
            pipe.enable_ether()
            pipe.set_ether_adapters(name)
        rows = latents[i * images_per_prompt : (i + 1) * images_per_prompt]
        expected.append(generate(pipe, [prompt], rows, num_images_per_prompt=images_per_prompt))
    pipe.enable_ether()
    mixed = generate(pipe, PROMPTS, latents, ether_adapters=assignment, num_images_per_prompt=images_per_prompt)
    np.testing.assert_allclose(mixed, np.concatenate(expected), atol=1e-4)

    # the same with the context manager on a plain call
    with ether_mixed_batch(pipe, assignment, images_per_prompt):
        again = generate(pipe, PROMPTS, latents, num_images_per_prompt=images_per_prompt)
    np.testing.assert_allclose(again, mixed, atol=1e-6)
    with pytest.raises(ValueError, match="one adapter"):
        generate(pipe, PROMPTS, latents, ether_adapters=["a"])


def test_from_pretrained_then_three_lines(tmp_path, tiny_pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = make_adapter(tiny_pipe, tmp_path / "a.safetensors", seed=1)
    tiny_pipe.save_pretrained(tmp_path / "model")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    pipe.set_progress_bar_config(disable=True)
    load_ether_weights(pipe, adapter)
    image = pipe("a red star", num_inference_steps=2, height=16, width=16).images[0]
    assert image.size == (16, 16)

    ours = EtherStableDiffusionPipeline.from_pretrained(tmp_path / "model")
    ours.set_progress_bar_config(disable=True)
    ours.load_ether_weights(adapter, "a")
    latents = fixed_latents(1)
    assert_close(
        torch.from_numpy(generate(ours, ["a red star"], latents)),
        torch.from_numpy(generate(pipe, ["a red star"], latents)),
    )
