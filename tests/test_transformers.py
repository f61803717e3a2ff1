"""Pipelines whose denoiser is a transformer (SD3, Flux), built tiny from configs as diffusers' own tests build them:
the target presets name their real projections, the pipeline verbs (load, set, fuse/unfuse, mixed batches, save,
disable, unload) work on them, errors name the model family, and the adapter sizes on the real SD3-medium and Flux-dev
architectures (meta device) are the ones in the docs."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    assert_model_unchanged,
    build_t5_tokenizer,
    build_tiny_components,
    build_tiny_flux_components,
    build_tiny_sd3_components,
    model_record,
    randomize_adapters,
)

from ether_diffusion import EtherConfig, inject
from ether_diffusion.architectures import FLUX_DEV_TRANSFORMER, SD3_MEDIUM_TRANSFORMER
from ether_diffusion.families import UnsupportedModelError, model_family, pipeline_family
from ether_diffusion.inject import adapter_layers, count_parameters, eject, find_targets
from ether_diffusion.io import AdapterFileError, AdapterMismatchError, read_adapter_file, save_adapter
from ether_diffusion.pipeline import (
    delete_ether_adapters,
    disable_ether,
    enable_ether,
    ether_mixed_batch,
    fuse_ether,
    get_list_ether_adapters,
    load_ether_weights,
    save_ether_weights,
    set_ether_adapters,
    unfuse_ether,
    unload_ether_weights,
)

ROOT = Path(__file__).resolve().parents[1]
T5_ATTENTION = ["q", "k", "v", "o"]  # T5's attention projections (T5Attention.q/k/v/o)


def tiny_pipe(family, tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    if family == "sd3":
        pipe = StableDiffusion3Pipeline(**build_tiny_sd3_components(tmp_path))
    else:
        pipe = FluxPipeline(**build_tiny_flux_components(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def t5_component(family):
    return "text_encoder_3" if family == "sd3" else "text_encoder_2"


def generate(pipe, prompts, per_prompt=1, **kwargs):
    """Image k of a call comes from seed k, so rows of different calls with the same index share their noise."""
    guidance = 3.0 if type(pipe).__name__ == "StableDiffusion3Pipeline" else 3.5  # SD3: CFG (batch doubled)
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts) * per_prompt)]
    return pipe(
        prompts,
        generator=generators,
        num_images_per_prompt=per_prompt,
        num_inference_steps=2,
        height=16,
        width=16,
        max_sequence_length=16,
        guidance_scale=guidance,
        output_type="np",
        **kwargs,
    ).images


def make_adapter(pipe, family, path, seed):
    """Inject into the transformer (the family's preset), CLIP and T5, move the vectors, save, remove."""
    inject(pipe.transformer, EtherConfig(method="ether_plus", n_blocks=2, target_modules=f"{family}-attention"), "tmp")
    inject(pipe.text_encoder, EtherConfig(method="ether", target_modules="text-encoder-attention"), "tmp")
    inject(getattr(pipe, t5_component(family)), EtherConfig(method="ether_plus", target_modules=T5_ATTENTION), "tmp")
    for i, component in enumerate(("transformer", "text_encoder", t5_component(family))):
        randomize_adapters(getattr(pipe, component), seed=seed + i)
    written = save_ether_weights(path, pipe, adapter_name="tmp")
    delete_ether_adapters(pipe, "tmp")
    return written


def plain_weights(model):
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if "ether_" not in k}


# --- presets name the real projections ------------------------------------------------------------------------------
def test_presets_cover_the_attention_projections_of_sd3_and_flux(tmp_path):
    sd3 = tiny_pipe("sd3", tmp_path).transformer
    found = {t.path for t in find_targets(sd3, EtherConfig(target_modules="sd3-attention"))}
    expected = {
        f"transformer_blocks.{i}.attn.{name}"
        for i in (0, 1)
        for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    }
    expected.discard("transformer_blocks.1.attn.to_add_out")  # the last block is context_pre_only: no text output
    assert found == expected
    flux = tiny_pipe("flux", tmp_path).transformer
    double = {
        f"transformer_blocks.0.attn.{name}"
        for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    }
    single = {f"single_transformer_blocks.0.attn.{name}" for name in ("to_q", "to_k", "to_v")}
    assert {t.path for t in find_targets(flux, EtherConfig(target_modules="flux-attention"))} == double | single
    with_ff = {t.path for t in find_targets(flux, EtherConfig(target_modules="flux-attention-ff"))}
    feed_forward = {
        "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.ff_context.net.0.proj",
        "transformer_blocks.0.ff_context.net.2",
        "single_transformer_blocks.0.proj_mlp",
    }
    assert with_ff == double | single | feed_forward
    assert "proj_out" not in with_ff  # the model's output layer is no attention projection


# --- the verbs --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_verbs_on_a_transformer_pipeline(family, tmp_path):
    """load (transformer, CLIP, T5) / fuse / unfuse (bit exact) / strength / mixed batch / disable / unload."""
    pipe = tiny_pipe(family, tmp_path)
    t5 = t5_component(family)
    path = make_adapter(pipe, family, tmp_path / "a.safetensors", seed=1)
    assert read_adapter_file(path).model_family == family
    prompts = ["a red star", "two dots"]
    base = generate(pipe, prompts)
    weights = {c: plain_weights(getattr(pipe, c)) for c in ("transformer", "text_encoder", t5)}

    assert load_ether_weights(pipe, path, adapter_name="subject") == "subject"
    assert get_list_ether_adapters(pipe) == {"transformer": ["subject"], "text_encoder": ["subject"], t5: ["subject"]}
    adapted = generate(pipe, prompts)
    assert np.abs(adapted - base).max() > 1e-3

    fuse_ether(pipe, safe_fusing=True)
    np.testing.assert_allclose(generate(pipe, prompts), adapted, atol=1e-4)
    unfuse_ether(pipe)
    for component, before in weights.items():
        after = plain_weights(getattr(pipe, component))
        assert all(torch.equal(after[k], before[k]) for k in before), component  # bit for bit
    np.testing.assert_allclose(generate(pipe, prompts), adapted, atol=1e-5)

    set_ether_adapters(pipe, "subject", 0.0)  # ETHER+ at strength 0 is the identity; ETHER (CLIP) has no dial
    set_ether_adapters(pipe, "subject", 1.0)
    np.testing.assert_allclose(generate(pipe, prompts), adapted, atol=1e-5)

    # one batch, each prompt with its adapter (SD3 doubles the transformer's batch for CFG; two images per prompt)
    with ether_mixed_batch(pipe, ["subject", None], num_images_per_prompt=2):
        mixed = generate(pipe, prompts, per_prompt=2)
    separate_adapted = generate(pipe, prompts, per_prompt=2)
    disable_ether(pipe)
    separate_base = generate(pipe, prompts, per_prompt=2)
    np.testing.assert_allclose(generate(pipe, prompts), base, atol=1e-5)
    enable_ether(pipe)
    np.testing.assert_allclose(mixed[:2], separate_adapted[:2], atol=1e-4)
    np.testing.assert_allclose(mixed[2:], separate_base[2:], atol=1e-4)
    assert np.abs(mixed[:2] - separate_base[:2]).max() > 1e-3  # the rows differ: the mixing does something

    unload_ether_weights(pipe)
    assert get_list_ether_adapters(pipe) == {}
    np.testing.assert_allclose(generate(pipe, prompts), base, atol=1e-5)


def test_a_flux_adapter_round_trips_through_a_saved_pipeline(tmp_path):
    """save_pretrained / from_pretrained of the model, then the file: the same images (the T5 tokenizer built in the
    test saves and loads offline)."""
    from diffusers import FluxPipeline

    pipe = tiny_pipe("flux", tmp_path)
    pipe.save_pretrained(tmp_path / "flux")
    path = make_adapter(pipe, "flux", tmp_path / "a.safetensors", seed=3)
    load_ether_weights(pipe, path)
    fresh = FluxPipeline.from_pretrained(tmp_path / "flux")
    fresh.set_progress_bar_config(disable=True)
    assert type(fresh.tokenizer_2).__name__.startswith("T5Tokenizer")
    load_ether_weights(fresh, path)
    np.testing.assert_allclose(generate(fresh, ["a sks star"]), generate(pipe, ["a sks star"]), atol=1e-6)


# --- the family decides, and the errors say so ------------------------------------------------------------------------
def test_family_detection_of_folders_and_pipelines(tmp_path):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline

    for family, pipeline_class in (("sd3", StableDiffusion3Pipeline), ("flux", FluxPipeline)):
        folder = tmp_path / family
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class.__name__}))
        assert model_family(folder).name == family
    sd3, flux = tiny_pipe("sd3", tmp_path), tiny_pipe("flux", tmp_path)
    assert pipeline_family(sd3).name == "sd3" and pipeline_family(flux).name == "flux"
    # by the denoiser when the pipeline class says nothing (a bare object holding the parts)
    assert pipeline_family(SimpleNamespace(transformer=flux.transformer)).name == "flux"
    assert pipeline_family(SimpleNamespace(transformer=torch.compile(sd3.transformer))).name == "sd3"
    assert pipeline_family(StableDiffusionPipeline(**build_tiny_components(tmp_path))).name == "sd"
    assert pipeline_family(SimpleNamespace(text_encoder=flux.text_encoder)) is None


def test_a_file_of_another_family_is_refused_naming_both(tmp_path):
    from diffusers import StableDiffusionPipeline

    sd3, flux = tiny_pipe("sd3", tmp_path), tiny_pipe("flux", tmp_path)
    sd = StableDiffusionPipeline(**build_tiny_components(tmp_path))
    flux_file = make_adapter(flux, "flux", tmp_path / "flux.safetensors", seed=1)
    inject(sd.unet, EtherConfig(), "tmp")
    sd_file = save_ether_weights(tmp_path / "sd.safetensors", sd, adapter_name="tmp")
    delete_ether_adapters(sd, "tmp")
    assert read_adapter_file(sd_file).model_family == "sd"

    cases = [
        (
            sd3,
            flux_file,
            "is an adapter for Flux models (FluxPipeline), and this StableDiffusion3Pipeline is a Stable "
            "Diffusion 3 pipeline: load it into a FluxPipeline",
        ),
        (
            flux,
            sd_file,
            "is an adapter for Stable Diffusion 1.x/2.x models (StableDiffusionPipeline), and this "
            "FluxPipeline is a Flux pipeline",
        ),
        (
            sd,
            flux_file,
            "is an adapter for Flux models (FluxPipeline), and this StableDiffusionPipeline is a Stable "
            "Diffusion 1.x/2.x pipeline",
        ),
    ]
    for pipe, file, message in cases:
        records = {c: model_record(m) for c, m in get_components(pipe).items()}
        with pytest.raises(AdapterMismatchError) as caught:
            load_ether_weights(pipe, file)
        assert message in str(caught.value) and "lacks" not in str(caught.value)
        for component, record in records.items():  # nothing changed
            assert_model_unchanged(getattr(pipe, component), record)

    # a file that records no family (components saved directly): named by what it adapts
    inject(flux.transformer, EtherConfig(target_modules="flux-attention"), "raw")
    raw = save_adapter(tmp_path / "raw.safetensors", {"transformer": flux.transformer}, "raw")
    assert read_adapter_file(raw).model_family is None
    with pytest.raises(
        AdapterMismatchError,
        match=r"adapter for a transformer model \(SD3 or Flux\) and adapts "
        r"\['transformer'\], which this StableDiffusionPipeline \(a Stable "
        r"Diffusion 1.x/2.x pipeline\) does not have",
    ):
        load_ether_weights(sd, raw)
    # ...and into a pipeline of its own family it loads
    assert load_ether_weights(tiny_pipe("flux", tmp_path), raw) == "raw"


def get_components(pipe):
    from ether_diffusion.pipeline import _components

    return _components(pipe)


def test_a_pipeline_of_an_unsupported_family_is_refused_with_one_message(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=1,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    tokenizer = build_t5_tokenizer()
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, decoder_start_token_id=0
        )
    )
    vae = AutoencoderKL(block_out_channels=(16,), norm_num_groups=16, latent_channels=4)
    pixart = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=DDIMScheduler()
    )
    flux_file = make_adapter(tiny_pipe("flux", tmp_path), "flux", tmp_path / "flux.safetensors", seed=1)
    record = model_record(pixart.transformer)
    with pytest.raises(UnsupportedModelError) as caught:
        load_ether_weights(pixart, flux_file)
    message = str(caught.value)
    assert message.startswith(
        "this PixArtAlphaPipeline is PixArt-α, which ether-diffusion does not support; supported:"
    )
    for label in (
        "Stable Diffusion 1.x/2.x",
        "Stable Diffusion XL",
        "Stable Diffusion 3 (StableDiffusion3Pipeline)",
        "Flux (FluxPipeline)",
    ):
        assert label in message
    assert_model_unchanged(pixart.transformer, record)
    folder = tmp_path / "pixart"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(UnsupportedModelError, match=r"is PixArt-α .*supported: .*Stable Diffusion 3 .*Flux"):
        model_family(folder)


def test_model_family_metadata_is_validated(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    pipe = tiny_pipe("flux", tmp_path)
    path = make_adapter(pipe, "flux", tmp_path / "a.safetensors", seed=1)
    with safe_open(str(path), "pt") as handle:
        tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    assert metadata["model_family"] == "flux"
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**metadata, "model_family": "Flux; rm -rf"})
    with pytest.raises(AdapterFileError, match="invalid 'model_family' metadata"):
        read_adapter_file(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="model_family must be a short name"):
        save_adapter(tmp_path / "c.safetensors", {"transformer": pipe.transformer}, "x", model_family="No Such")


# --- export to LoRA ---------------------------------------------------------------------------------------------------
def transformer_adapter(pipe, family, path, targets, seed=1):
    """ETHER+ (two blocks) on the transformer's ``targets`` and ETHER on CLIP-L, moved from their init, saved."""
    inject(pipe.transformer, EtherConfig(method="ether_plus", n_blocks=2, target_modules=targets), "tmp")
    inject(pipe.text_encoder, EtherConfig(method="ether", target_modules="text-encoder-attention"), "tmp")
    for i, component in enumerate(("transformer", "text_encoder")):
        randomize_adapters(getattr(pipe, component), seed=seed + i)
    written = save_ether_weights(path, pipe, adapter_name="tmp")
    delete_ether_adapters(pipe, "tmp")
    return written


# Every Flux layer kind the kohya export names, except single_blocks_<i>_linear1 (q, k, v, proj_mlp), which diffusers'
# converter splits at Flux-dev's widths (3 x 3072 + 12288), not a tiny model's: the next test checks its layout
FLUX_KOHYA_TARGETS = [
    *(f"transformer_blocks.0.{name}" for name in ("attn.to_q", "attn.to_k", "attn.to_v", "to_out.0", "add_q_proj",
                                                  "add_v_proj", "to_add_out", "ff.net.0.proj", "ff_context.net.2",
                                                  "norm1.linear", "norm1_context.linear")),
    "single_transformer_blocks.0.proj_out",
    "single_transformer_blocks.0.norm.linear",
]  # fmt: skip


@pytest.mark.slow  # stock diffusers pipelines loading the exported files: the end-to-end tier
@pytest.mark.parametrize(
    "family, format, targets",
    [
        ("sd3", "diffusers", "sd3-attention"),
        ("flux", "diffusers", "flux-attention-ff"),
        ("flux", "kohya", FLUX_KOHYA_TARGETS),
    ],
)
def test_stock_transformer_pipeline_reproduces_the_adapter_from_its_lora(family, format, targets, tmp_path):
    """A stock StableDiffusion3Pipeline / FluxPipeline + load_lora_weights(exported file) gives the ETHER images."""
    from safetensors.torch import load_file

    from ether_diffusion.export import export_adapters

    pipe = tiny_pipe(family, tmp_path)
    base = generate(pipe, ["a red star"])
    adapter = transformer_adapter(pipe, family, tmp_path / "a.safetensors", targets)
    load_ether_weights(pipe, adapter, "subject")
    reference = generate(pipe, ["a red star"])
    assert np.abs(reference - base).max() > 1e-2  # the adapter changes the images

    fresh = tiny_pipe(family, tmp_path)
    output = tmp_path / "lora.safetensors"
    summary = export_adapters([adapter], output, fresh, format=format, dtype="fp32")
    assert set(summary.layers) == {"transformer", "text_encoder"}
    assert get_list_ether_adapters(fresh) == {}  # export leaves the pipeline as it found it
    fresh.load_lora_weights(str(output))
    assert np.abs(generate(fresh, ["a red star"]) - reference).max() <= 1e-4

    keys = list(load_file(output))
    prefixes = ("lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_", "lora_te1_") if format == "kohya" else (
        "transformer.", "text_encoder.")  # fmt: skip
    assert all(k.startswith(prefixes) for k in keys)
    for prefix in prefixes:
        assert any(k.startswith(prefix) for k in keys), prefix
    if format == "kohya":  # q, k, v are one layer there (and add_k_proj, not adapted, a zero share of txt_attn_qkv)
        assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
        from test_export import assert_consumer_text_encoder_names

        assert_consumer_text_encoder_names(keys)  # CLIP-L under kohya's Flux prefix lora_te1_
        assert not any("to_q" in k for k in keys)
    if family == "flux":
        from safetensors import safe_open

        with safe_open(str(output), "pt") as handle:
            header = handle.metadata()
        dev = fresh.transformer.config.guidance_embeds
        assert header["ss_base_model_version"] == "flux1" and "modelspec.prediction_type" not in header
        assert header["modelspec.architecture"] == f"flux-1-{'dev' if dev else 'schnell'}/lora"


def test_flux_kohya_single_blocks_fuse_q_k_v_and_the_mlp_input_in_the_original_layout(tmp_path):
    """sd-scripts' ``single_blocks_<i>_linear1`` is the original checkpoint's fused layer: rows q, k, v, then the MLP
    input. Applied to that fused weight (built from the base model), the file's factors give the ETHER-adapted
    layers' weights; ``up`` is block-diagonal in four equal shares of the rank (what diffusers' converter splits)."""
    from safetensors.torch import load_file

    from ether_diffusion.export import export_adapters

    pipe = tiny_pipe("flux", tmp_path)
    block = "single_transformer_blocks.0"
    members = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    fused_base = torch.cat([pipe.transformer.get_submodule(f"{block}.{m}").weight.double() for m in members])
    targets = [f"{block}.attn.to_q", f"{block}.attn.to_v", "proj_mlp"]
    adapter = transformer_adapter(pipe, "flux", tmp_path / "a.safetensors", targets)
    tensors = load_file(export_adapters([adapter], tmp_path / "k.safetensors", pipe, format="kohya", dtype="fp32").path)
    name = "lora_unet_single_blocks_0_linear1"
    down, up = tensors[f"{name}.lora_down.weight"].double(), tensors[f"{name}.lora_up.weight"].double()
    assert float(tensors[f"{name}.alpha"]) == down.shape[0]  # scale 1

    load_ether_weights(pipe, adapter, "subject")
    fuse_ether(pipe)
    modules = [pipe.transformer.get_submodule(f"{block}.{m}") for m in members]
    adapted = torch.cat([getattr(m, "base_layer", m).weight.double() for m in modules])  # fused: the merged weights
    assert (adapted - fused_base).abs().max() > 1e-3
    assert torch.allclose(fused_base + up @ down, adapted, atol=1e-5)
    rows = [getattr(m, "base_layer", m).weight.shape[0] for m in modules]
    share, start = down.shape[0] // 4, 0
    for j, count in enumerate(rows):
        outside = torch.ones(up.shape[1], dtype=torch.bool)
        outside[j * share : (j + 1) * share] = False
        assert up[start : start + count, outside].abs().max() == 0
        start += count
    assert up[rows[0] : rows[0] + rows[1]].abs().max() == 0  # to_k has no adapter: its share is zero
    assert "lora_unet_single_blocks_0_linear2.lora_down.weight" not in tensors  # proj_out was not adapted


@pytest.mark.slow  # a subprocess: the end-to-end tier
def test_cli_exports_a_flux_adapter_for_a_flux_folder(tmp_path):
    """``ether-diffusion export --model <Flux folder> --format kohya``: the folder's family picks the pipeline and the
    names; a stock FluxPipeline loads the file and draws the ETHER images. A T5 adapter is an error, not a file."""
    import subprocess
    import sys

    from diffusers import FluxPipeline

    cli = str(Path(sys.executable).parent / "ether-diffusion")
    pipe = tiny_pipe("flux", tmp_path)
    pipe.save_pretrained(tmp_path / "flux")
    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "to_out.0"]
    adapter = transformer_adapter(pipe, "flux", tmp_path / "a.safetensors", targets)
    load_ether_weights(pipe, adapter)
    reference = generate(pipe, ["a sks star"])
    output = tmp_path / "lora.safetensors"
    args = [cli, "export", str(adapter), "--model", str(tmp_path / "flux"), "--format", "kohya", "--dtype", "fp32"]
    result = subprocess.run([*args, "--output", str(output)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kohya LoRA written" in result.stdout and "ranks [1, 8, 24] on 10 layers" in result.stdout, result.stdout
    stock = FluxPipeline.from_pretrained(tmp_path / "flux")
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(output))
    assert np.abs(generate(stock, ["a sks star"]) - reference).max() <= 1e-4

    with_t5 = make_adapter(tiny_pipe("flux", tmp_path), "flux", tmp_path / "t5.safetensors", seed=2)
    refused = subprocess.run([*args[:2], str(with_t5), *args[3:], "--output", str(tmp_path / "t5-lora.safetensors")],
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert refused.returncode == 2 and "T5 encoder" in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "t5-lora.safetensors").exists()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_export_refuses_what_no_lora_loader_applies(family, tmp_path):
    """An adapter on a T5 encoder cannot travel as LoRA (diffusers' SD3/Flux loaders read none for T5), and SD3 has
    no kohya format: both say so before anything is written."""
    from ether_diffusion.export import export_adapters

    pipe = tiny_pipe(family, tmp_path)
    with_t5 = make_adapter(pipe, family, tmp_path / "t5.safetensors", seed=1)
    output = tmp_path / "lora.safetensors"
    with pytest.raises(ValueError, match=rf"{t5_component(family)} \(a T5 encoder\).*load_lora_weights reads"):
        export_adapters([with_t5], output, pipe)
    assert not output.exists() and get_list_ether_adapters(pipe) == {}
    if family == "flux":  # sd-scripts' embedding and final-layer names: diffusers' converter misreads them
        embedder = transformer_adapter(pipe, family, tmp_path / "x.safetensors", ["x_embedder", "to_q"])
        with pytest.raises(ValueError, match="'x_embedder' has no kohya name.*format='diffusers'"):
            export_adapters([embedder], output, pipe, format="kohya")
        assert not output.exists()
    if family == "sd3":
        plain = transformer_adapter(pipe, family, tmp_path / "a.safetensors", "sd3-attention")
        with pytest.raises(ValueError, match="Stable Diffusion 3 has no kohya LoRA export.*format='diffusers'"):
            export_adapters([plain], output, pipe, format="kohya")
        assert not output.exists()


# --- sizes on the real architectures --------------------------------------------------------------------------------
SD3_MEDIUM, FLUX_DEV = SD3_MEDIUM_TRANSFORMER, FLUX_DEV_TRANSFORMER  # ether_diffusion/architectures.py

# (method, sides) -> (adapted layers, trained parameters) with the family's preset; "training" excludes what the
# DreamBooth task leaves out (SD3's last block's unread add_q_proj)
TRANSFORMER_COUNTS = {
    "sd3": {
        ("ether", None): 293_376,
        ("ether_plus", None): 1_173_504,
        ("ether_plus", ("input",)): 586_752,
        ("lora", None): 2_347_008,
    },
    "flux": {
        ("ether", None): 817_152,
        ("ether_plus", None): 3_268_608,
        ("ether_plus", ("input",)): 1_634_304,
        ("lora", None): 6_537_216,
    },
}
TRANSFORMER_LAYERS = {"sd3": 191, "flux": 266}
TRAINED_SD3 = {"ether": 291_840, "ether_plus": 1_167_360}  # 190 layers: without the last block's add_q_proj


def test_parameter_counts_on_the_real_sd3_medium_and_flux_dev_architectures():
    """ETHER / ETHER+ / LoRA r=4 sizes on SD3-medium's and Flux-dev's transformers built on the meta device (no
    weights), pinned here and in docs/transformers.md."""
    import peft
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    docs = (ROOT / "docs" / "transformers.md").read_text()
    with torch.device("meta"):
        models = {"sd3": SD3Transformer2DModel(**SD3_MEDIUM), "flux": FluxTransformer2DModel(**FLUX_DEV)}
    # the published sizes: SD3-medium's MMDiT has 2B parameters, Flux-dev's transformer 12B
    assert sum(p.numel() for p in models["sd3"].parameters()) == 2_028_328_000
    assert sum(p.numel() for p in models["flux"].parameters()) == 11_901_408_320
    for family, model in models.items():
        preset = f"{family}-attention"
        for (method, sides), expected in TRANSFORMER_COUNTS[family].items():
            if method == "lora":
                targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
                peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets), model)
                count = sum(p.numel() for name, p in model.named_parameters() if ".lora_" in name)
            else:
                layers = inject(model, EtherConfig(method=method, sides=sides, target_modules=preset))
                assert len(layers) == TRANSFORMER_LAYERS[family]
                count = count_parameters(model)
                eject(model)
            assert count == expected, (family, method, sides)
            assert f"{expected:,}" in docs, f"{expected:,} missing from docs/transformers.md"
    with torch.device("meta"):  # a fresh one: PEFT's LoRA stays in the first
        sd3 = SD3Transformer2DModel(**SD3_MEDIUM)
    for method, expected in TRAINED_SD3.items():
        unread = ["transformer_blocks.23.attn.add_q_proj"]  # what the SD3 backend leaves out (tested in test_flow)
        assert (
            len(inject(sd3, EtherConfig(method=method, target_modules="sd3-attention", exclude_modules=unread))) == 190
        )
        assert count_parameters(sd3) == expected and f"{expected:,}" in docs
        eject(sd3)
    assert len(dict(adapter_layers(sd3))) == 0
    # --train_text_encoder: all of CLIP-L's attention (SD3 and Flux read its last layer through the pooled output)
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                              num_hidden_layers=12, max_position_embeddings=77))  # fmt: skip
    for method, expected in {"ether": 36_864, "ether_plus": 147_456}.items():
        assert len(inject(clip_l, EtherConfig(method=method, target_modules="text-encoder-attention"))) == 48
        assert count_parameters(clip_l) == expected and f"{expected:,}" in docs
        eject(clip_l)
