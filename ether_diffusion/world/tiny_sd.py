"""The tiny Stable Diffusion: component configs, construction, and saving as a standard diffusers folder.

64x64 RGB -> AutoencoderKL (x4 down) -> 4x16x16 latents; UNet2DConditionModel with cross-attention down/up
blocks at 16x16 and 8x8 and a cross-attention mid block at 4x4 (attention widths 64 and 96: divisible by
ETHER's n_blocks 4 and 16); a 3-layer
CLIPTextModel of width 128 over the world tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .scene import IMAGE_SIZE
from .tokenizer import BOS, EOS, MODEL_MAX_LENGTH, load_tokenizer, save_tokenizer_files, write_vocab_and_merges

LATENT_SCALE = 4  # pixels per latent cell

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=IMAGE_SIZE,
)
UNET_CONFIG = dict(
    sample_size=IMAGE_SIZE // LATENT_SCALE,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 64, 96),
    layers_per_block=1,
    cross_attention_dim=128,
    attention_head_dim=(2, 2, 3),  # number of heads per block (diffusers' historic name): head width 32
    norm_num_groups=32,
)
TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MODEL_MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=128,
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="epsilon",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
        **TEXT_CONFIG,
    )
    return CLIPTextModel(config)


def build_tokenizer(directory: str | Path):
    return load_tokenizer(save_tokenizer_files(directory))


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})


def sampling_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def save_pipeline_folder(directory: str | Path, tokenizer, text_encoder, vae, unet) -> Path:
    """Write a diffusers folder loadable with ``StableDiffusionPipeline.from_pretrained`` (safetensors only,
    no safety checker, no feature extractor)."""
    from diffusers import StableDiffusionPipeline

    directory = Path(directory)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    write_vocab_and_merges(directory / "tokenizer")
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    index["requires_safety_checker"] = False
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return directory


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
