"""Exact export of ETHER adapters to LoRA: the math per layer, and stock diffusers reproducing the images."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TinyMLP, build_tiny_sdxl_components, randomize_adapters
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.testing import assert_close

from ether_diffusion import EtherConfig, inject, save_adapter, set_active_adapters
from ether_diffusion.bench import lora_sizes
from ether_diffusion.export import (
    export_adapters,
    kohya_name,
    layer_lora_factors,
    lora_factors,
    lora_rank,
    save_lora,
)
from ether_diffusion.finite import NonFiniteError
from ether_diffusion.inject import adapter_layers, delete_adapter, merge_adapters, unmerge_adapters
from ether_diffusion.io import AdapterMismatchError, read_adapter_file

TINY_SD = Path(__file__).resolve().parents[1] / "assets" / "tiny-sd"
CLI = str(Path(sys.executable).parent / "ether-diffusion")
ALL_UNET_LAYERS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "proj_in", "proj_out"]


# --- the math, layer by layer --------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Conv2d(8, 12, 1)
        self.proj_out = nn.Conv2d(12, 8, 1, bias=False)

    def forward(self, x):
        return self.proj_out(self.proj_in(x))


def transformed_weight(layer) -> torch.Tensor:
    """``W'`` as the wrapper computes it: its forward on the identity, minus the bias (float64)."""
    eye = torch.eye(layer.in_features, dtype=torch.float64)
    if isinstance(layer.base_layer, nn.Conv2d):
        eye = eye[:, :, None, None]  # ``in`` one-pixel images
    zero = torch.zeros_like(eye)
    with torch.no_grad():
        return (layer(eye) - layer(zero)).reshape(layer.in_features, layer.out_features).T


def assert_factors_match_forward(model):
    """``W + up · down`` of every layer equals the weight its wrapper applies, in float64."""
    model.double()
    factors = lora_factors(model)
    assert set(factors) == {path for path, _ in adapter_layers(model)}
    for path, layer in adapter_layers(model):
        found = factors[path]
        base = layer.base_layer.weight.detach().reshape(layer.out_features, layer.in_features)
        assert_close(base + found.delta(), transformed_weight(layer), rtol=0, atol=1e-12)
    return factors


@pytest.mark.parametrize(
    "configs, expected_rank",
    [
        ([EtherConfig(method="ether", n_blocks=1)], 1),
        ([EtherConfig(method="ether", n_blocks=4)], 4),
        ([EtherConfig(method="ether_plus", n_blocks=2, sides=("input",))], 4),
        ([EtherConfig(method="ether_plus", n_blocks=2, sides=("output",))], 4),
        ([EtherConfig(method="ether_plus", n_blocks=2)], 8),  # two-sided: 4n
        ([EtherConfig(method="ether", n_blocks=2), EtherConfig(method="ether_plus", n_blocks=1)], 2 + 4),
        ([EtherConfig(method="ether_plus"), EtherConfig(method="ether_plus", n_blocks=4), EtherConfig()], 4 + 16 + 4),
    ],
)
def test_factors_are_the_exact_weight_change(configs, expected_rank):
    torch.manual_seed(0)
    for model, targets in ((TinyMLP(), ["to_q", "to_v", "to_out.0"]), (ConvNet(), ["proj_in", "proj_out"])):
        names = []
        for i, config in enumerate(configs):
            config.target_modules = targets
            inject(model, config, f"a{i}")
            randomize_adapters(model, f"a{i}", seed=i + 1)
            names.append(f"a{i}")
        set_active_adapters(model, names, [1.0, 0.7, 1.3][: len(names)])
        factors = assert_factors_match_forward(model)
        assert {f.rank for f in factors.values()} == {expected_rank}
        assert expected_rank == sum(lora_rank(c) for c in configs)
        assert {f.conv for f in factors.values()} == {isinstance(model, ConvNet)}


def test_strength_is_linear_one_sided_and_quadratic_two_sided():
    torch.manual_seed(0)
    for sides, linear in ((("input",), True), (("output",), True), (("input", "output"), False)):
        model = TinyMLP()
        inject(model, EtherConfig(method="ether_plus", sides=sides, target_modules=["to_q"]))
        randomize_adapters(model)
        layer = dict(adapter_layers(model))["to_q"]
        full = layer_lora_factors(layer).delta()
        set_active_adapters(model, "default", 0.5)
        half = layer_lora_factors(layer).delta()
        assert torch.allclose(half, 0.5 * full, atol=1e-12) == linear


def test_nothing_active_fused_or_disabled():
    model = TinyMLP()
    inject(model, EtherConfig(method="ether", target_modules=["to_q"]))
    randomize_adapters(model)
    layer = dict(adapter_layers(model))["to_q"]
    set_active_adapters(model, [])
    assert layer_lora_factors(layer) is None and lora_factors(model) == {}
    set_active_adapters(model, "default")
    merge_adapters(model)
    with pytest.raises(RuntimeError, match="unfuse_ether"):
        lora_factors(model)
    unmerge_adapters(model)
    layer.adapters_enabled = False
    assert lora_factors(model) == {}
    with pytest.raises(ValueError, match="no active ETHER adapter"):
        save_lora("/nonexistent/x.safetensors", unet=model)


def test_kohya_names():
    assert kohya_name("unet", "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0") == (
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0"
    )
    assert kohya_name("text_encoder", "text_model.encoder.layers.3.self_attn.q_proj") == (
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    )
    assert kohya_name("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1").startswith("lora_te2_")
    # transformers 5 names CLIPTextModel's layers without the text_model. level: the file keeps the original name
    assert kohya_name("text_encoder", "encoder.layers.3.self_attn.q_proj") == (
        "lora_te_text_model_encoder_layers_3_self_attn_q_proj"
    )
    assert kohya_name("text_encoder", "encoder.layers.0.mlp.fc1", two_encoders=True) == (
        "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    )
    with pytest.raises(ValueError, match="kohya format names only"):
        kohya_name("vae", "decoder.conv_in")


# --- what export refuses, writing nothing --------------------------------------------------------------------


def files_beside(path):
    return sorted(p.name for p in path.parent.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".tmp"))


@pytest.mark.parametrize(
    "strength, dtype, message",
    [
        (1e5, "fp16", r"beyond fp16's range \(max 65504; .*at strength 100000: export in fp32 or bf16 \(CLI: --dtype"),
        (1e30, "fp32", r"beyond fp32's range .*at strength 1e\+30: export at a smaller strength"),
    ],
)
def test_an_overflowing_lora_is_refused_and_the_good_file_kept(tiny_pipe, tmp_path, strength, dtype, message):
    """Two-sided ETHER+ grows with the square of its strength: factors beyond the file's dtype are infinities that
    load without complaint and draw black images, so the export stops, names the layer, and writes nothing."""
    adapter = make_adapter(tiny_pipe, tmp_path / "a.safetensors", EtherConfig(method="ether_plus"))
    output = tmp_path / "good.safetensors"
    export_adapters([adapter], output, tiny_pipe, dtype=dtype)
    good = output.read_bytes()
    layer = r"^the LoRA factor unet\.down_blocks\.\S+\.lora_[AB]\.weight holds values "
    with pytest.raises(NonFiniteError, match=layer + message):
        export_adapters([(adapter, strength)], output, tiny_pipe, dtype=dtype)
    assert output.read_bytes() == good and files_beside(output) == ["a.safetensors", "good.safetensors"]
    assert not list(adapter_layers(tiny_pipe.unet))  # the pipeline is left as it was


@pytest.mark.parametrize("strength", [float("nan"), float("inf")])
def test_a_strength_that_is_not_a_number_is_refused(tiny_pipe, tmp_path, strength):
    adapter = make_adapter(tiny_pipe, tmp_path / "a.safetensors", EtherConfig(method="ether"))
    with pytest.raises(ValueError, match=f"the weight {strength} of adapter 'export0' is not a finite number"):
        export_adapters([adapter], tmp_path / "x.safetensors", tiny_pipe, strength=strength)
    assert files_beside(adapter) == ["a.safetensors"]


@pytest.mark.parametrize("family, label", [("sdxl", "Stable Diffusion XL"), ("flux", "Flux")])
def test_export_refuses_a_file_of_another_family_as_loading_does(tiny_pipe, tmp_path, family, label):
    """An SD-shaped file whose metadata says it was made for SDXL or Flux: loading it into the SD pipeline refuses
    it, and so does the export, with the same message naming both families."""
    from ether_diffusion.pipeline import load_ether_weights

    sd = make_adapter(tiny_pipe, tmp_path / "sd.safetensors", EtherConfig(method="ether"))
    relabelled = tmp_path / f"{family}.safetensors"
    with safe_open(str(sd), "pt") as handle:
        save_file({k: handle.get_tensor(k) for k in handle.keys()}, str(relabelled),
                  metadata={**handle.metadata(), "model_family": family})  # fmt: skip
    with pytest.raises(AdapterMismatchError) as loading:
        load_ether_weights(tiny_pipe, relabelled)
    with pytest.raises(AdapterMismatchError) as exporting:
        export_adapters([relabelled], tmp_path / "x.safetensors", tiny_pipe)
    assert str(exporting.value) == str(loading.value)
    assert f"an adapter for {label} models" in str(exporting.value) and "Stable Diffusion 1.x/2.x" in str(loading.value)
    assert not (tmp_path / "x.safetensors").exists() and not list(adapter_layers(tiny_pipe.unet))


def test_an_sdxl_adapter_exported_with_an_sd_model_names_both_families(tiny_pipe, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from ether_diffusion.pipeline import save_ether_weights

    sdxl = StableDiffusionXLPipeline(**build_tiny_sdxl_components(tmp_path))
    inject(sdxl.unet, EtherConfig(method="ether"), "tmp")
    adapter = save_ether_weights(tmp_path / "xl.safetensors", sdxl, "tmp")  # records model_family "sdxl"
    with pytest.raises(
        AdapterMismatchError, match="adapter for Stable Diffusion XL models .* Stable Diffusion 1.x/2.x"
    ) as err:
        export_adapters([adapter], tmp_path / "x.safetensors", tiny_pipe)
    assert "layers this model lacks" not in str(err.value)


def disk_full(tensors, filename, metadata=None):
    """safetensors' save_file on a full disk: a partial temporary of its own beside ``filename``, then its error."""
    (Path(filename).parent / ".tmpAbC123").write_bytes(b"partial")
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_during_export_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    from ether_diffusion.cli import main

    adapter = make_adapter(load_stock(), tmp_path / "a.safetensors", EtherConfig(method="ether"))
    output = tmp_path / "out" / "good.safetensors"
    output.parent.mkdir()
    output.write_bytes(b"a good LoRA")
    monkeypatch.setattr("ether_diffusion.export.save_file", disk_full)
    argv = ["export", str(adapter), "--model", str(TINY_SD), "--format", "kohya", "--output", str(output)]
    assert main([*argv, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"error: could not write the LoRA to '{output}': the disk is full (No space left on device in "
        f"'{output.parent}'); the file that was there is unchanged. Free some space or write elsewhere, then run again"
    )
    assert output.read_bytes() == b"a good LoRA" and os.listdir(output.parent) == ["good.safetensors"]


def test_the_default_export_is_exact_and_prints_its_measured_bound(tmp_path, capsys):
    """fp32 by default (fp16 files drew 5.7e-4 from the adapter's images, above the promised 1e-4): the CLI prints
    the bound it measured for the dtype written."""
    from safetensors.torch import load_file

    from ether_diffusion.cli import main

    adapter = make_adapter(load_stock(), tmp_path / "a.safetensors", EtherConfig(method="ether_plus", n_blocks=2))
    output = tmp_path / "lora.safetensors"
    assert (
        main(["export", str(adapter), "--model", str(TINY_SD), "--format", "diffusers", "--output", str(output)]) == 0
    )
    out = capsys.readouterr().out
    assert {t.dtype for t in load_file(str(output)).values()} == {torch.float32}
    bound = re.search(r"to within (\S+) \((\S+) of a layer's largest change: fp32 rounding", out)
    assert bound, out
    assert 0 < float(bound.group(2)) < 1e-6  # fp32: float rounding of the factors
    argv = ["export", str(adapter), "--model", str(TINY_SD), "--format", "kohya", "--output", str(output)]
    assert main([*argv, "--dtype", "fp16", "--overwrite"]) == 0
    half = re.search(r"\((\S+) of a layer's largest change: fp16 rounding", capsys.readouterr().out)
    assert 1e-5 < float(half.group(1)) < 2e-3  # fp16 keeps 11 significant bits


@pytest.mark.parametrize(
    "recorded, message",
    [
        ("{tiny}", None),  # a model on this machine: used
        ("tiny-sd", None),  # the shipped tiny model, recorded by its name: the shipped one
        (
            "/nowhere/sd-1.5",
            "error: the adapter was trained on '/nowhere/sd-1.5', which is not on this machine: pass "
            "--model with that model's folder or checkpoint file",
        ),  # fmt: skip
        (
            "someone/not-downloaded",
            "error: the adapter's recorded base model 'someone/not-downloaded' could not be loaded (",
        ),  # fmt: skip
    ],
)
def test_export_without_model_uses_the_recorded_base_model(recorded, message, tmp_path, capsys):
    from ether_diffusion.cli import main

    recorded = recorded.format(tiny=TINY_SD)
    adapter = make_adapter(load_stock(), tmp_path / "a.safetensors", EtherConfig(method="ether"), base_model=recorded)
    output = tmp_path / "lora.safetensors"
    code = main(["export", str(adapter), "--format", "kohya", "--output", str(output)])
    out, err = capsys.readouterr()
    if message is None:
        assert code == 0 and output.is_file(), err
        assert ("exporting against the base model the adapter records" in out) == (recorded == str(TINY_SD))
        reference = tmp_path / "reference.safetensors"
        assert main(["export", str(adapter), "--model", str(TINY_SD), "--format", "kohya", "--output",
                     str(reference)]) == 0  # fmt: skip
        mine, theirs = load_file(str(output)), load_file(str(reference))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    else:
        last = err.strip().splitlines()[-1]  # (above it: the progress bars of building the adapter here)
        assert code == 2 and last.startswith(message), err
        assert "pass --model" in last and not output.exists()


def test_export_of_adapters_recording_different_models_asks_for_one(tmp_path, capsys):
    from ether_diffusion.cli import main

    first = make_adapter(load_stock(), tmp_path / "a.safetensors", EtherConfig(method="ether"), base_model="x/one")
    second = make_adapter(load_stock(), tmp_path / "b.safetensors", EtherConfig(method="ether"), base_model="x/two")
    assert (
        main(["export", str(first), str(second), "--format", "kohya", "--output", str(tmp_path / "l.safetensors")]) == 2
    )
    assert "the adapters record different base models (x/one, x/two): pass --model" in capsys.readouterr().err


# --- stock diffusers reproduces the ETHER images --------------------------------------------------------------


def load_stock():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TINY_SD, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a red star and a blue circle"):
    return pipe([prompt], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images


def make_adapter(pipe, path, unet_config=None, text_config=None, seed=1, base_model="tiny-sd"):
    """An adapter file on the tiny model with vectors moved far from their init (ETHER+ is not the identity)."""
    components = {}
    for component, config in (("unet", unet_config), ("text_encoder", text_config)):
        if config is not None:
            model = getattr(pipe, component)
            inject(model, config, "tmp")
            randomize_adapters(model, "tmp", seed=seed + len(components))
            components[component] = model
    written = save_adapter(path, components, "tmp", base_model=base_model)
    for model in components.values():
        delete_adapter(model, "tmp")
    return written


CASES = {
    "ether-n1": [(EtherConfig(method="ether"), None, 1.0)],
    "ether-n4-ff-conv": [(EtherConfig(method="ether", n_blocks=4, target_modules=ALL_UNET_LAYERS), None, 1.0)],
    "ether-plus-two-sided": [(EtherConfig(method="ether_plus", n_blocks=2, target_modules=ALL_UNET_LAYERS), None, 1.0)],
    "composed": [
        (EtherConfig(method="ether", target_modules="unet-attention-ff"), None, 1.0),
        (EtherConfig(method="ether_plus", target_modules=["to_q"]), None, 0.6),  # to_q: rank 5, the rest rank 1
    ],
    "text-encoder": [
        (
            EtherConfig(method="ether_plus", n_blocks=1),
            EtherConfig(method="ether", n_blocks=2, target_modules=["q_proj", "v_proj", "out_proj", "mlp.fc1"]),
            1.0,
        )
    ],
}


@pytest.fixture(scope="module")
def source_pipe():
    return load_stock()


@pytest.fixture(scope="module")
def case_files(source_pipe, tmp_path_factory):
    """{case: ([(file, strength)], reference images of the ETHER-adapted pipeline)}."""
    from ether_diffusion.pipeline import delete_ether_adapters, load_ether_weights, set_ether_adapters

    folder = tmp_path_factory.mktemp("adapters")
    pipe = source_pipe
    found = {}
    for case, specs in CASES.items():
        files = [
            (make_adapter(pipe, folder / f"{case}{i}.safetensors", u, t, seed=10 * i + 1), s)
            for i, (u, t, s) in enumerate(specs)
        ]
        names = [load_ether_weights(pipe, f, f"x{i}") for i, (f, _) in enumerate(files)]
        set_ether_adapters(pipe, names, [s for _, s in files])
        found[case] = (files, generate(pipe))
        delete_ether_adapters(pipe, names)
    found["base"] = generate(pipe)
    return found


@pytest.mark.slow  # stock diffusers pipelines loading the exported files: the end-to-end tier
@pytest.mark.parametrize("format", ["diffusers", "kohya"])
@pytest.mark.parametrize("case", list(CASES))
def test_stock_diffusers_reproduces_the_ether_images(case, format, case_files, source_pipe, tmp_path):
    files, reference = case_files[case]
    output = tmp_path / "lora.safetensors"
    summary = export_adapters(files, output, source_pipe, format=format, dtype="fp32")
    assert summary.path == output and output.stat().st_size == summary.bytes
    assert not list(adapter_layers(source_pipe.unet))  # the export left the pipeline as it was

    stock = load_stock()
    stock.load_lora_weights(str(output))  # kohya files go through diffusers' kohya converter
    images = generate(stock)
    assert np.abs(reference - case_files["base"]).max() > 0.1  # the adapter changes the images
    assert np.abs(images - reference).max() <= 1e-4

    with safe_open(str(output), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    if format == "kohya":
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
        assert summary.file_rank == int(metadata["ss_network_dim"])
        assert_consumer_text_encoder_names(keys)
    else:
        assert all(k.startswith(("unet.", "text_encoder.")) and ".lora_" in k for k in keys)
    assert any(k.startswith(("text_encoder.", "lora_te_")) for k in keys) == (case == "text-encoder")
    sources = json.loads(metadata["ether_sources"])
    assert [s["strength"] for s in sources] == [s for _, s in files]
    # what A1111 and kohya's tools read to place the file: an SD 1.x LoRA, epsilon, the model's native size
    side = source_pipe.unet.config.sample_size * source_pipe.vae_scale_factor
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sd_v1", "False")
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.implementation"] == "diffusers" and metadata["modelspec.title"] == "lora"
    assert (metadata["modelspec.resolution"], metadata["modelspec.prediction_type"]) == (f"{side}x{side}", "epsilon")
    assert metadata["modelspec.sai_model_spec"] == "1.0.0" and metadata["modelspec.date"][:2] == "20"
    assert all(s["methods"]["unet"]["method"] in ("ether", "ether_plus") for s in sources)


def test_the_header_names_sd2_and_v_prediction_as_kohya_does():
    """SD 2.x is told by its 1024-wide text context, v prediction by the scheduler (configs of SD 2.1 768-v)."""
    from types import SimpleNamespace

    from ether_diffusion.export import base_model_metadata

    def pipe(width, prediction):
        unet = SimpleNamespace(config={"cross_attention_dim": width, "sample_size": 96})
        return SimpleNamespace(unet=unet, scheduler=SimpleNamespace(config={"prediction_type": prediction}),
                               vae_scale_factor=8)  # fmt: skip

    v = base_model_metadata(pipe(1024, "v_prediction"), "sd", "x")
    assert (v["ss_base_model_version"], v["ss_v2"]) == ("sd_v2_v", "True")
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and v["modelspec.resolution"] == "768x768"
    assert v["modelspec.prediction_type"] == "v"
    base = base_model_metadata(pipe(1024, "epsilon"), "sd", "x")
    assert base["modelspec.architecture"] == "stable-diffusion-v2-512/lora" and base["ss_base_model_version"] == "sd_v2"


# The text-encoder LoRA names the consumers match, and nothing else: ComfyUI's comfy/lora.py (model_lora_keys_clip:
# "lora_te_text_model_encoder_layers_{b}_{c}", lora_te1_/lora_te2_ for SDXL's CLIP-L/CLIP-G, with c one of
# LORA_CLIP_MAP's self_attn_{q,k,v,out}_proj and mlp_fc1/mlp_fc2), kohya sd-scripts' networks/lora.py (the CLIP
# module path under the lora_te prefix, '.' → '_') and A1111's Lora extension (kohya's names).
CONSUMER_TEXT_ENCODER_KEY = re.compile(
    r"lora_te[12]?_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])\.(lora_down\.weight|lora_up\.weight|alpha)"
)


def assert_consumer_text_encoder_names(keys):
    text = [k for k in keys if k.startswith("lora_te")]
    wrong = [k for k in text if not CONSUMER_TEXT_ENCODER_KEY.fullmatch(k)]
    assert not wrong, wrong[:3]


def strip_padding(path, target):
    """The kohya file as an exporter without padding writes it: each layer at its own rank, alpha = its rank."""
    tensors, out = load_file(str(path)), {}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight"):
            name = key.removesuffix(".lora_down.weight")
            keep = down.flatten(1).abs().sum(1) > 0  # the padded rows are exactly zero
            out[key] = down[keep].contiguous()
            out[f"{name}.lora_up.weight"] = tensors[f"{name}.lora_up.weight"][:, keep].contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(keep.sum()))
    save_file(out, str(target))
    return {int(v.item()) for k, v in out.items() if k.endswith(".alpha")}


@pytest.mark.slow  # stock diffusers pipelines loading the exported files: the end-to-end tier
@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_stock_sdxl_pipeline_reproduces_an_sdxl_adapter(format, tmp_path):
    """An adapter on the UNet and both text encoders of an SDXL pipeline: stock StableDiffusionXLPipeline +
    load_lora_weights(exported) gives the ETHER images (kohya files: lora_te1_/lora_te2_, as kohya's SDXL files)."""
    from diffusers import StableDiffusionXLPipeline

    from ether_diffusion.pipeline import load_ether_weights

    def sdxl():
        pipe = StableDiffusionXLPipeline(**build_tiny_sdxl_components(tmp_path, seed=0))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def images(pipe):
        generator = torch.Generator().manual_seed(0)
        return pipe(["a red star"], num_inference_steps=3, generator=generator, output_type="np").images

    pipe = sdxl()
    base = images(pipe)
    components = {}
    for i, (component, config) in enumerate(
        (
            ("unet", EtherConfig(method="ether_plus", target_modules="unet-attention")),
            ("text_encoder", EtherConfig(method="ether", n_blocks=2, target_modules="text-encoder-attention")),
            ("text_encoder_2", EtherConfig(method="ether_plus", target_modules=["q_proj", "out_proj", "fc1"])),
        )
    ):
        model = getattr(pipe, component)
        inject(model, config, "tmp")
        randomize_adapters(model, "tmp", seed=i + 1)
        components[component] = model
    adapter = save_adapter(tmp_path / "sdxl.safetensors", components, "tmp", base_model="tiny-sdxl")
    for model in components.values():
        delete_adapter(model, "tmp")

    load_ether_weights(pipe, adapter, "subject")
    reference = images(pipe)
    assert np.abs(reference - base).max() > 0.1  # the adapter changes the images

    fresh = sdxl()
    output = tmp_path / "lora.safetensors"
    summary = export_adapters([adapter], output, fresh, format=format, dtype="fp32")
    assert set(summary.layers) == {"unet", "text_encoder", "text_encoder_2"}
    fresh.load_lora_weights(str(output))
    assert np.abs(images(fresh) - reference).max() <= 1e-4

    keys = list(load_file(output))
    if format == "kohya":
        assert_consumer_text_encoder_names(keys)
    with safe_open(str(output), "pt") as handle:
        header = handle.metadata()
    assert (header["ss_base_model_version"], header["modelspec.architecture"]) == (
        "sdxl_base_v1-0",
        "stable-diffusion-xl-v1-base/lora",
    )  # fmt: skip  (A1111 no longer files it as SD1)
    assert header["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    prefixes = ("lora_unet_", "lora_te1_", "lora_te2_") if format == "kohya" else ("unet.", "text_encoder.",
                                                                                     "text_encoder_2.")  # fmt: skip
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix
    assert all(k.startswith(prefixes) for k in keys)


@pytest.mark.slow  # stock diffusers pipelines loading the exported files: the end-to-end tier
def test_kohya_mixed_ranks_need_the_padding(case_files, source_pipe, tmp_path):
    """diffusers' kohya loader keeps per-layer alphas under stale names: one rank for every layer avoids it."""
    files, reference = case_files["composed"]
    padded = export_adapters(files, tmp_path / "padded.safetensors", source_pipe, format="kohya", dtype="fp32")
    assert padded.ranks == {"unet": [1, 5]} and padded.file_rank == 5
    assert strip_padding(padded.path, tmp_path / "unpadded.safetensors") == {1, 5}
    errors = {}
    for name in ("padded", "unpadded"):
        stock = load_stock()
        if name == "padded":
            stock.load_lora_weights(str(tmp_path / f"{name}.safetensors"))
        else:  # PEFT says so: the alphas of the attention layers arrive under names no module has
            with pytest.warns(RuntimeWarning, match="alpha_pattern keys did not match"):
                stock.load_lora_weights(str(tmp_path / f"{name}.safetensors"))
        errors[name] = np.abs(generate(stock) - reference).max()
    assert errors["padded"] <= 1e-4
    assert errors["unpadded"] > 0.05, errors  # the trap: to_q layers load at scale 1/5


@pytest.mark.slow  # stock diffusers pipelines loading the exported files: the end-to-end tier
def test_diffusers_keys_are_those_save_lora_weights_writes(source_pipe, tmp_path):
    """Same keys and shapes as a PEFT LoRA of the same rank and targets saved by diffusers itself."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    adapter = make_adapter(
        source_pipe,
        tmp_path / "a.safetensors",
        EtherConfig(method="ether", n_blocks=2, target_modules=ALL_UNET_LAYERS),
        EtherConfig(method="ether", n_blocks=2, target_modules="text-encoder-attention"),
    )
    ours = export_adapters([adapter], tmp_path / "ours.safetensors", source_pipe, dtype="fp32").path

    stock = load_stock()
    inject_adapter_in_model(LoraConfig(r=2, target_modules=ALL_UNET_LAYERS), stock.unet)
    text_targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
    inject_adapter_in_model(LoraConfig(r=2, target_modules=text_targets), stock.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "peft",
        unet_lora_layers=get_peft_model_state_dict(stock.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(stock.text_encoder),
    )
    theirs = load_file(str(tmp_path / "peft" / "pytorch_lora_weights.safetensors"))
    mine = load_file(str(ours))
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.slow  # stock diffusers pipelines loading the exported files: the end-to-end tier
def test_lora_weight_is_ether_strength_only_one_sided(case_files, source_pipe, tmp_path):
    """A LoRA weight of 0.5 equals ETHER strength 0.5 for one-sided ETHER+, not for two-sided ETHER+."""
    from ether_diffusion.pipeline import delete_ether_adapters, load_ether_weights, set_ether_adapters

    for sides, same in ((("input",), True), (("input", "output"), False)):
        adapter = make_adapter(source_pipe, tmp_path / "a.safetensors", EtherConfig(method="ether_plus", sides=sides))
        load_ether_weights(source_pipe, adapter, "dial")
        set_ether_adapters(source_pipe, "dial", 0.5)
        reference = generate(source_pipe)
        delete_ether_adapters(source_pipe, "dial")
        export_adapters([adapter], tmp_path / "full.safetensors", source_pipe, dtype="fp32")
        stock = load_stock()
        stock.load_lora_weights(str(tmp_path / "full.safetensors"), adapter_name="full")
        stock.set_adapters("full", 0.5)
        assert (np.abs(generate(stock) - reference).max() <= 1e-4) == same
        if not same:  # exported at strength 0.5 instead, it matches at LoRA weight 1
            export_adapters([(adapter, 0.5)], tmp_path / "half.safetensors", source_pipe, dtype="fp32")
            stock = load_stock()
            stock.load_lora_weights(str(tmp_path / "half.safetensors"))
            assert np.abs(generate(stock) - reference).max() <= 1e-4


@pytest.mark.slow  # stock diffusers pipelines loading the exported files: the end-to-end tier
def test_half_precision_file(case_files, source_pipe, tmp_path):
    files, reference = case_files["ether-n1"]
    fp32 = export_adapters(files, tmp_path / "fp32.safetensors", source_pipe, dtype="fp32")
    fp16 = export_adapters(files, tmp_path / "fp16.safetensors", source_pipe, dtype="fp16")
    half, full = load_file(str(fp16.path)), load_file(str(fp32.path))
    assert {v.dtype for v in half.values()} == {torch.float16} and half.keys() == full.keys()
    assert sum(v.nbytes for v in half.values()) * 2 == sum(v.nbytes for v in full.values())
    stock = load_stock()
    stock.load_lora_weights(str(fp16.path))
    assert np.abs(generate(stock) - reference).max() < 2e-3  # fp16 factors: close (1e-4 measured), not exact


@pytest.mark.slow  # stock diffusers pipelines loading the exported files: the end-to-end tier
def test_control_file_exports_its_unet_part_only_when_asked(source_pipe, tmp_path):
    from ether_diffusion.control.encoder import ConditionEncoder, ConditionEncoderConfig
    from ether_diffusion.control.pipeline import save_control_weights
    from ether_diffusion.pipeline import load_ether_weights

    inject(source_pipe.unet, EtherConfig(method="ether_plus", target_modules="unet-attention-ff"), "c")
    randomize_adapters(source_pipe.unet, "c")
    encoder = ConditionEncoder(ConditionEncoderConfig.for_model(source_pipe.unet, source_pipe.vae_scale_factor))
    control = save_control_weights(tmp_path / "control.safetensors", source_pipe.unet, encoder, "c")
    plain = save_adapter(tmp_path / "plain.safetensors", {"unet": source_pipe.unet}, "c")
    delete_adapter(source_pipe.unet, "c")

    with pytest.raises(ValueError, match="condition encoder .* not a weight change .* --unet_only"):
        export_adapters([control], tmp_path / "x.safetensors", source_pipe)
    assert not (tmp_path / "x.safetensors").exists()
    summary = export_adapters([control], tmp_path / "x.safetensors", source_pipe, dtype="fp32", unet_only=True)
    assert summary.notes and "UNet adapters only" in summary.notes[0]

    load_ether_weights(source_pipe, plain, "plain")  # the same UNet adapters from a plain file
    reference = generate(source_pipe)
    from ether_diffusion.pipeline import delete_ether_adapters

    delete_ether_adapters(source_pipe, "plain")
    stock = load_stock()
    stock.load_lora_weights(str(summary.path))
    assert np.abs(generate(stock) - reference).max() <= 1e-4


@pytest.mark.slow  # a subprocess or a full-size model: the end-to-end tier
def test_cli_export(case_files, tmp_path):
    files, reference = case_files["composed"]
    (first, _), (second, strength) = files
    output = tmp_path / "style.safetensors"
    args = list(map(str, [CLI, "export", first, f"{second}:{strength}", "--model", TINY_SD, "--format", "kohya"]))
    result = subprocess.run([*args, "--output", str(output), "--dtype", "fp32"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "rank 5" in result.stdout and str(output) in result.stdout
    stock = load_stock()
    stock.load_lora_weights(str(output))
    assert np.abs(generate(stock) - reference).max() <= 1e-4

    again = subprocess.run([*args, "--output", str(output)], capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr and "--overwrite" in again.stderr
    wrong = subprocess.run([*args, "--output", str(tmp_path / "x.pt")], capture_output=True, text=True)
    assert wrong.returncode == 2 and ".safetensors" in wrong.stderr


@pytest.mark.slow  # a subprocess or a full-size model: the end-to-end tier
def test_documented_sd15_sizes_come_from_the_architecture():
    """Rows of the docs/export.md table, recomputed on the SD-1.5 UNet built on the meta device."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    table = lora_sizes.table(blocks=(1, 4))
    rows = table.splitlines()[2:]
    assert len(rows) == 6 and all(row in docs for row in rows), table
    assert "| ETHER | 1 | 99,456 | 1 | 0.44 MB | 0.45 MB |" in rows  # the reference's 0.44 MB


@pytest.mark.slow  # full-size architectures on the meta device: the end-to-end tier
def test_documented_transformer_lora_sizes_come_from_the_architectures():
    """The SD3-medium and Flux-dev rows of docs/export.md, recomputed (meta device) by bench lora-sizes."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    for model, label in (("sd3-medium", "SD3-medium"), ("flux-dev", "Flux-dev")):
        rows = lora_sizes.table(blocks=(1,), model=model).splitlines()[2:]
        documented = [row for row in rows if "one-sided" not in row]
        assert len(documented) == 2
        for row in documented:
            assert f"| {label} {row}" in docs, row


# --- the export without the pipeline (export_from_folder) ------------------------------------------------------


def both_ways(adapters, folder, tmp_path, format):
    """The LoRA of ``adapters`` [(file, strength)] by the folder's way and by the pipeline's: (tensors, header) each."""
    from safetensors import safe_open

    from ether_diffusion.export import export_from_folder
    from ether_diffusion.models import load_pipeline

    read = [(read_adapter_file(path), strength) for path, strength in adapters]
    fast = export_from_folder(read, tmp_path / "fast.safetensors", folder, format=format)
    assert fast is not None
    slow = export_adapters(read, tmp_path / "slow.safetensors", load_pipeline(str(folder)), format=format)
    found = []
    for summary in (fast, slow):
        with safe_open(str(summary.path), "pt") as handle:
            found.append(({k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()))
    return found


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_the_folder_export_writes_the_pipelines_file(format, tmp_path):
    """The same tensors, bit for bit, and the same header (but its title and date) as loading the pipeline: two
    adapters composed at two strengths, on the tiny model as shipped (fp32) and saved in fp16."""
    from diffusers import StableDiffusionPipeline

    first = make_adapter(load_stock(), tmp_path / "a.safetensors", EtherConfig(method="ether_plus", n_blocks=2))
    on_q = EtherConfig(method="ether", target_modules=["to_q"])
    second = make_adapter(load_stock(), tmp_path / "b.safetensors", on_q, seed=5)
    half = tmp_path / "tiny-fp16"
    StableDiffusionPipeline.from_pretrained(TINY_SD).to(torch.float16).save_pretrained(half)
    for folder in (TINY_SD, half):
        (fast, fast_header), (slow, slow_header) = both_ways([(first, 1.0), (second, 0.6)], folder, tmp_path, format)
        assert fast.keys() == slow.keys() and all(torch.equal(fast[k], slow[k]) for k in fast), folder
        volatile = {"modelspec.title", "modelspec.date"}
        assert {k: v for k, v in fast_header.items() if k not in volatile} == {
            k: v for k, v in slow_header.items() if k not in volatile
        }


def test_the_folder_export_leaves_what_it_does_not_take_to_the_pipeline(tmp_path):
    import dataclasses

    from ether_diffusion.export import export_from_folder

    pipe = load_stock()
    on_text = EtherConfig(method="ether", target_modules="text-encoder-attention")
    text = read_adapter_file(make_adapter(pipe, tmp_path / "t.safetensors", EtherConfig(method="ether"), on_text))
    unet = read_adapter_file(make_adapter(pipe, tmp_path / "u.safetensors", EtherConfig(method="ether")))
    out = tmp_path / "l.safetensors"
    assert export_from_folder([(text, 1.0)], out, TINY_SD) is None  # a text-encoder adapter
    assert export_from_folder([(unet, 1.0)], out, tmp_path) is None  # not a diffusers folder
    assert not out.exists()
    other = dataclasses.replace(unet, model_family="sdxl")
    with pytest.raises(ValueError, match="is an adapter for Stable Diffusion XL models .* export it against the model"):
        export_from_folder([(other, 1.0)], out, TINY_SD)


def test_a_damaged_model_folder_is_one_clear_error_and_writes_nothing(tmp_path, capsys):
    """The folder's weights cannot be read: the folder export steps aside and the loader names the damaged file."""
    import shutil

    from ether_diffusion.cli import main

    adapter = make_adapter(load_stock(), tmp_path / "a.safetensors", EtherConfig(method="ether"))
    damaged = tmp_path / "model"
    shutil.copytree(TINY_SD, damaged)
    weights = damaged / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    output = tmp_path / "lora.safetensors"
    argv = ["export", str(adapter), "--model", str(damaged), "--format", "kohya", "--output", str(output)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: could not load the base model '{damaged}'") and "diffusion_pytorch_model" in err
    assert not output.exists()
