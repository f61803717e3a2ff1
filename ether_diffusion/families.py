"""Model families: which kind of diffusers model a path holds, declared once.

A diffusers model folder names its pipeline class in ``model_index.json`` (``_class_name``); that is how training, the
command line and sampling pick the pipeline and the training task without a flag:

    family = model_family("path/to/sdxl-base")      # FAMILIES["sdxl"]
    family.pipeline_class()                          # diffusers.StableDiffusionXLPipeline
    model_family("path/to/sd3")                      # UnsupportedModelError: names the family and what is supported

A new family (SD3, Flux, ...) is one entry of ``FAMILIES`` plus its training task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .models import ModelLoadError, default_model, is_single_file

__all__ = ["FAMILIES", "ModelFamily", "UnsupportedModelError", "model_class_name", "model_family", "require_family"]


class UnsupportedModelError(ModelLoadError):
    """The model is of a family this library does not handle (yet); the message says which ones it does."""


@dataclass(frozen=True)
class ModelFamily:
    name: str  # "sd", "sdxl"
    label: str  # how people call it
    pipeline: str  # the diffusers pipeline class that loads and samples it
    class_names: tuple[str, ...]  # model_index.json ``_class_name`` values of this family

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)


FAMILIES: dict[str, ModelFamily] = {
    "sd": ModelFamily(
        "sd",
        "Stable Diffusion 1.x/2.x",
        "StableDiffusionPipeline",
        ("StableDiffusionPipeline", "EtherStableDiffusionPipeline", "EtherControlPipeline"),
    ),
    "sdxl": ModelFamily("sdxl", "Stable Diffusion XL", "StableDiffusionXLPipeline", ("StableDiffusionXLPipeline",)),
}

# Families people ask for that are not handled here: named in the error instead of a crash deep inside diffusers.
_KNOWN_OTHERS = {
    "StableDiffusionXLImg2ImgPipeline": "the Stable Diffusion XL refiner",
    "StableDiffusion3Pipeline": "Stable Diffusion 3",
    "FluxPipeline": "Flux",
    "PixArtAlphaPipeline": "PixArt-α",
    "PixArtSigmaPipeline": "PixArt-Σ",
    "SanaPipeline": "Sana",
    "KandinskyV22Pipeline": "Kandinsky 2.2",
    "StableDiffusionInpaintPipeline": "a Stable Diffusion inpainting model",
    "StableDiffusionXLInpaintPipeline": "a Stable Diffusion XL inpainting model",
}


def model_class_name(
    model: str | Path | None, revision: str | None = None, config: str | Path | None = None
) -> str | None:
    """``_class_name`` of ``model``'s ``model_index.json`` (a local folder, or a hub id when reachable; for a single
    checkpoint file, that of its ``config`` folder); ``None`` when it cannot be read (the loader then says why)."""
    if model is not None and is_single_file(model):
        return None if config is None else model_class_name(config)
    path = Path(str(model or default_model())).expanduser()
    index = path / "model_index.json"
    if index.is_file():
        try:
            return json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            return None
    if path.exists() or str(model).startswith((".", "/", "~")):
        return None  # a local path that is not a model folder: the loader's error says so
    try:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(str(model), revision=revision).get("_class_name")
    except Exception:  # offline, no such repo: the loader says why when it tries
        return None


def model_family(
    model: str | Path | None, revision: str | None = None, config: str | Path | None = None
) -> ModelFamily:
    """The family of ``model`` (default: the shipped tiny model; a single checkpoint file: its ``config`` folder's).
    A model whose ``model_index.json`` cannot be read counts as Stable Diffusion 1.x/2.x (its loader reports the real
    problem); a readable one of another family raises ``UnsupportedModelError``."""
    class_name = model_class_name(model, revision, config)
    if class_name is None:
        return FAMILIES["sd"]
    for family in FAMILIES.values():
        if class_name in family.class_names:
            return family
    supported = "; ".join(f"{f.label} ({f.pipeline})" for f in FAMILIES.values())
    what = _KNOWN_OTHERS.get(class_name, "a model family")
    raise UnsupportedModelError(
        f"'{model}' is {what} ({class_name} in its model_index.json), which ether-diffusion does not support; "
        f"supported: {supported}"
    )


def require_family(model: str | Path | None, supported: tuple[str, ...], what: str, hint: str = "",
                   revision: str | None = None, config: str | Path | None = None) -> ModelFamily:  # fmt: skip
    """``model``'s family if ``what`` (e.g. "control training") supports it, else ``UnsupportedModelError`` naming the
    model's family, what is supported and ``hint``."""
    family = model_family(model, revision, config)
    if family.name in supported:
        return family
    labels = " and ".join(FAMILIES[name].label for name in supported)
    raise UnsupportedModelError(
        f"'{model}' is a {family.label} model ({family.pipeline}); {what} supports {labels} models"
        + (f". {hint}" if hint else "")
    )
