"""Where the shipped assets live (the tiny Stable Diffusion, its subjects, the world evaluator), and checks with errors
that say how to regenerate them. Standard library and safetensors only: every loader imports this module."""

from __future__ import annotations

import json
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
PRETRAIN_HINT = (
    "ether-diffusion world pretrain --export_dir assets/tiny-sd "
    "(then ether-diffusion world evaluate --write_model_card); see assets/tiny-sd/README.md for the exact flags"
)
SUBJECTS_HINT = "ether-diffusion world make-subjects --output_dir assets/subjects"

# component -> files a tiny-sd folder must hold
_PIPELINE_FILES = {
    "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
    "vae": ("config.json", "diffusion_pytorch_model.safetensors"),
    "text_encoder": ("config.json", "model.safetensors"),
    "tokenizer": ("tokenizer_config.json",),
    "scheduler": ("scheduler_config.json",),
}


class AssetError(RuntimeError):
    """A shipped asset is missing or unreadable; the message names the file and how to regenerate it."""


def default_model_path() -> Path:
    return ASSETS_DIR / "tiny-sd"


def default_subjects_path() -> Path:
    return ASSETS_DIR / "subjects"


def check_pipeline_folder(path: str | Path) -> Path:
    """Raise AssetError unless ``path`` holds every file of the tiny pipeline and its safetensors parse."""
    from safetensors import safe_open

    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise AssetError(
            f"{path / 'model_index.json'} is missing: the tiny Stable Diffusion is not there. "
            f"Regenerate it with: {PRETRAIN_HINT}"
        )
    try:
        json.loads((path / "model_index.json").read_text())
    except ValueError as err:
        raise AssetError(
            f"{path / 'model_index.json'} is not valid JSON ({err}). Regenerate with: {PRETRAIN_HINT}"
        ) from err
    for component, files in _PIPELINE_FILES.items():
        for name in files:
            f = path / component / name
            if not f.is_file():
                raise AssetError(f"{f} is missing. Regenerate the tiny Stable Diffusion with: {PRETRAIN_HINT}")
            if name.endswith(".safetensors"):
                try:
                    with safe_open(str(f), framework="pt") as handle:
                        for key in handle.keys():
                            handle.get_tensor(key)
                except Exception as err:  # safetensors raises several types for truncated or garbled files
                    raise AssetError(f"{f} is corrupt ({err}). Regenerate it with: {PRETRAIN_HINT}") from err
    return path
