"""Tiny real components built from configs (no downloads): the diffusers way of testing pipelines."""

from __future__ import annotations

import json
import os
import socket
import string

import pytest
import torch
from torch import nn


def build_char_tokenizer(folder):
    """A CLIPTokenizer whose vocabulary is single characters: every word tokenizes, nothing is downloaded."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + ",.!?'-"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def build_tiny_components(tmp_path, seed: int = 0, prediction_type: str = "epsilon"):
    """A tiny SD pipeline's components; ``prediction_type="v_prediction"`` makes it an SD 2.x-style v model."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16,
    )
    tokenizer = build_char_tokenizer(tmp_path)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=tokenizer.vocab_size,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_components(tmp_path, seed: int = 0) -> dict:
    """A tiny SDXL pipeline's components, as diffusers' own SDXL tests build them: a text_time UNet conditioned on two
    32-wide CLIP encoders side by side (64) and the second's 32-wide projection plus six size/crop ids (6 * 8 + 32)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16,
    )
    tokenizer = build_char_tokenizer(tmp_path)
    text_config = dict(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config, projection_dim=32))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=scheduler,
    )


def build_t5_tokenizer(max_length: int = 16):
    """A T5 tokenizer (Unigram, as T5's) whose pieces are single characters: built from a vocabulary in memory, so no
    sentencepiece model and no download. Ids: <pad> 0, </s> 1, <unk> 2, as T5's."""
    from transformers import T5Tokenizer

    chars = string.ascii_lowercase + string.digits + ",.!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]  # "▁a" starts a word
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def _tiny_text_config(vocab_size: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=vocab_size, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1, **extra)  # fmt: skip


def _tiny_t5(vocab_size: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0,
                                   eos_token_id=1))  # fmt: skip


def _tiny_flow_vae(shift_factor: float, scaling_factor: float):
    """SD3/Flux-style VAE (shift and scale, no quant convs), 16-pixel images to 8 x 8 x 4 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4,
                         norm_num_groups=16, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16, shift_factor=shift_factor,
                         scaling_factor=scaling_factor, use_quant_conv=False, use_post_quant_conv=False)  # fmt: skip


def build_tiny_sd3_components(tmp_path, seed: int = 0) -> dict:
    """A tiny StableDiffusion3Pipeline's components, as diffusers' SD3 tests build them: a 2-block MMDiT (patch 2, the
    last block context_pre_only), two 32-wide CLIP encoders with projections (pooled 64), a 64-wide T5 (the joint
    attention width, so the CLIP states are padded to it as on SD3) and a shift-3 flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16)  # fmt: skip
    tokenizer, t5_tokenizer = build_char_tokenizer(tmp_path), build_t5_tokenizer()
    return dict(
        transformer=transformer.eval(),
        vae=_tiny_flow_vae(0.0609, 1.5035).eval(),
        text_encoder=CLIPTextModelWithProjection(_tiny_text_config(tokenizer.vocab_size, projection_dim=32)).eval(),
        text_encoder_2=CLIPTextModelWithProjection(_tiny_text_config(tokenizer.vocab_size, projection_dim=32)).eval(),
        text_encoder_3=_tiny_t5(len(t5_tokenizer), 64).eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=t5_tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def build_tiny_flux_components(tmp_path, seed: int = 0) -> dict:
    """A tiny FluxPipeline's components, as diffusers' Flux tests build them: one double- and one single-stream block
    with guidance embedding (as Flux-dev), a 32-wide CLIP encoder (pooled 32) and a 32-wide T5 (the joint attention
    width)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
                                         guidance_embeds=True)  # fmt: skip
    tokenizer, t5_tokenizer = build_char_tokenizer(tmp_path), build_t5_tokenizer()
    return dict(
        transformer=transformer.eval(),
        vae=_tiny_flow_vae(0.1159, 0.3611).eval(),
        text_encoder=CLIPTextModel(_tiny_text_config(tokenizer.vocab_size)).eval(),
        text_encoder_2=_tiny_t5(len(t5_tokenizer), 32).eval(),
        tokenizer=tokenizer,
        tokenizer_2=t5_tokenizer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def png_header(width: int, height: int) -> bytes:
    """A PNG that is only its signature and header (IHDR, IEND): it claims ``width``×``height`` pixels without
    holding any, which is all a decompression bomb needs to be refused (or not)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def build_training_world(root, image_size=(24, 20)):
    """A tiny SD pipeline saved to ``root/model`` and three random instance images (plus a caption file that
    must be ignored) in ``root/instance``: what the training tests train on."""
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    (root / "tokenizer").mkdir()
    StableDiffusionPipeline(**build_tiny_components(root / "tokenizer")).save_pretrained(root / "model")
    instance = root / "instance"
    instance.mkdir()
    rng = np.random.default_rng(0)
    width, height = image_size
    for i in range(3):
        Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8")).save(instance / f"{i}.png")
    (instance / "captions.txt").write_text("ignored: not an image")
    return root


@pytest.fixture(scope="session")
def training_world(tmp_path_factory):
    """The tiny SD world the training tests share, read-only: ``build_training_world`` with square 16-pixel images
    (the model's resolution: one crop each)."""
    return build_training_world(tmp_path_factory.mktemp("training-world"), (16, 16))


def dreambooth_config(world, output_dir, **changes):
    """A short DreamBooth run on ``world`` (``build_training_world``) as a typed configuration: 2 steps, quiet, no
    trackers, 2-step validation of one image; ``changes`` set or override any field."""
    from ether_diffusion.training.dreambooth import DreamBoothConfig

    fields = dict(
        pretrained_model_name_or_path=str(world / "model"),
        instance_data_dir=str(world / "instance"),
        instance_prompt="a sks star",
        output_dir=str(output_dir),
        report_to="none",
        quiet=True,
        max_train_steps=2,
        validation_inference_steps=2,
        num_validation_images=1,
    )
    return DreamBoothConfig(**{**fields, **changes})


@pytest.fixture
def tiny_components(tmp_path):
    return build_tiny_components(tmp_path)


@pytest.fixture
def tiny_pipe(tiny_components):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**tiny_components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_unet(tiny_components):
    return tiny_components["unet"]


class TinyMLP(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.to_q = nn.Linear(width, width)
        self.to_k = nn.Linear(width, 2 * width, bias=False)
        self.act = nn.GELU()
        self.block = nn.ModuleDict({"to_v": nn.Linear(2 * width, width), "to_out": nn.Sequential(nn.Linear(width, 8))})
        self.ether_lookalike = nn.Linear(8, 8)  # a base layer whose name looks like an adapter's

    def forward(self, x):
        h = self.to_q(x) + self.act(self.to_k(x))[..., : x.shape[-1]]
        h = self.block["to_v"](torch.cat([h, x], dim=-1))
        return self.ether_lookalike(self.block["to_out"](h))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return TinyMLP()


def randomize_adapters(model, adapter_name=None, seed: int = 1):
    """Move adapter vectors away from their init so that ETHER+ is not the identity."""
    from ether_diffusion.inject import adapter_parameters

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_parameters(model, adapter_name):
            param.copy_(torch.randn(param.shape, generator=generator).to(param.dtype))


def build_metric_models(root):
    """A tiny DINO ViT and a tiny CLIP (character tokenizer) with random weights, saved as local folders as
    ``--dino_model`` / ``--clip_model`` name them; returns their two paths."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    torch.manual_seed(0)
    dino = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              image_size=32, patch_size=8), add_pooling_layer=False)  # fmt: skip
    dino.save_pretrained(root / "dino")
    (root / "tokenizer").mkdir()
    tokenizer = build_char_tokenizer(root / "tokenizer")
    text = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return root / "dino", root / "clip"


def stop_process(process) -> None:
    """Terminate a server the test started (a studio), killing it if it does not stop within 15 s."""
    import subprocess

    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env() -> dict[str, str]:
    """The environment for an ``accelerate launch`` child: nothing left over from accelerate state created by other
    tests in this process, one thread per process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "MASTER_", "TORCHELASTIC_"))
        and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    }
    return {**env, "OMP_NUM_THREADS": "1"}


def model_record(model):
    """Everything a failed operation must leave as it was: which module object sits at every path, the state dict
    (keys and values), each wrapper's adapters, activation and strengths, and the model's adapter configs."""
    from ether_diffusion.layers import EtherLayer

    modules = dict(model.named_modules())
    return {
        "modules": {path: id(module) for path, module in modules.items()},
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "adapters": {
            path: (list(m.ether_adapters), list(m.active_adapters), dict(m.strengths), m.adapters_enabled)
            for path, m in modules.items()
            if isinstance(m, EtherLayer)
        },
        "configs": dict(getattr(model, "_ether_configs", {})),
        "has_configs": "_ether_configs" in model.__dict__,
    }


def assert_model_unchanged(model, before):
    after = model_record(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], before["state"][k]) for k in before["state"])
    assert after["adapters"] == before["adapters"]
    assert after["configs"] == before["configs"] and after["has_configs"] == before["has_configs"]
