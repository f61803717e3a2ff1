"""Model families: which kind of diffusers model a path holds, declared once.

A diffusers model folder names its pipeline class in ``model_index.json`` (``_class_name``); that is how training, the
command line and sampling pick the pipeline and the training task without a flag:

    family = model_family("path/to/sdxl-base")      # FAMILIES["sdxl"]
    family.pipeline_class()                          # diffusers.StableDiffusionXLPipeline
    model_family("path/to/pixart")                   # UnsupportedModelError: names the family and what is supported
    pipeline_family(pipe)                            # the family of a pipeline object (its class, else its denoiser)

A new family is one entry of ``FAMILIES`` plus its training task (``training/dreambooth.py``'s ``_tasks``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .sources import ModelLoadError, default_model, is_single_file

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "UnsupportedModelError",
    "check_supported_pipeline",
    "model_class_name",
    "model_family",
    "pipeline_family",
    "require_family",
    "supported_families",
]


class UnsupportedModelError(ModelLoadError):
    """The model is of a family this library does not handle (yet); the message says which ones it does."""


@dataclass(frozen=True)
class ModelFamily:
    name: str  # "sd", "sdxl", "sd3", "flux"
    label: str  # how people call it
    pipeline: str  # the diffusers pipeline class that loads and samples it
    class_names: tuple[str, ...]  # model_index.json ``_class_name`` values of this family
    denoiser: str = "unet"  # the pipeline attribute holding the denoiser ("unet" or "transformer")
    denoiser_class: str = "UNet2DConditionModel"  # the diffusers class of that denoiser
    target_preset: str = "unet-attention"  # config.TARGET_PRESETS entry: the denoiser's attention projections

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
    "sd3": ModelFamily(
        "sd3",
        "Stable Diffusion 3",
        "StableDiffusion3Pipeline",
        ("StableDiffusion3Pipeline",),
        "transformer",
        "SD3Transformer2DModel",
        "sd3-attention",
    ),
    "flux": ModelFamily(
        "flux", "Flux", "FluxPipeline", ("FluxPipeline",), "transformer", "FluxTransformer2DModel", "flux-attention"
    ),
}

# Families people ask for that are not handled here: named in the error instead of a crash deep inside diffusers.
_KNOWN_OTHERS = {
    "StableDiffusionXLImg2ImgPipeline": "the Stable Diffusion XL refiner",
    "PixArtAlphaPipeline": "PixArt-α",
    "PixArtSigmaPipeline": "PixArt-Σ",
    "SanaPipeline": "Sana",
    "KandinskyV22Pipeline": "Kandinsky 2.2",
    "StableDiffusionInpaintPipeline": "a Stable Diffusion inpainting model",
    "StableDiffusionXLInpaintPipeline": "a Stable Diffusion XL inpainting model",
    "FluxFillPipeline": "Flux Fill (inpainting)",
    "FluxKontextPipeline": "Flux Kontext",
    "Flux2Pipeline": "Flux 2",
    "AuraFlowPipeline": "AuraFlow",
    "CogView4Pipeline": "CogView4",
    "HiDreamImagePipeline": "HiDream",
    "Lumina2Pipeline": "Lumina 2",
    "QwenImagePipeline": "Qwen-Image",
    "HunyuanDiTPipeline": "Hunyuan-DiT",
}


def supported_families() -> str:
    """``"Stable Diffusion 1.x/2.x (StableDiffusionPipeline); ..."``: what error messages list as supported."""
    return "; ".join(f"{f.label} ({f.pipeline})" for f in FAMILIES.values())


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


def other_family(recorded: str | None, family: ModelFamily | None) -> ModelFamily | None:
    """The family a file records (``AdapterFile.model_family``) where it is known and is not ``family``: a file made
    for another model family, which loading or exporting refuses. None where nothing says so."""
    made = FAMILIES.get(recorded or "")
    return made if made is not None and family is not None and made is not family else None


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
    what = _KNOWN_OTHERS.get(class_name, "a model family")
    raise UnsupportedModelError(
        f"'{model}' is {what} ({class_name} in its model_index.json), which ether-diffusion does not support; "
        f"supported: {supported_families()}"
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


# --- pipeline objects ------------------------------------------------------------------------------------------------
def _class_names(obj) -> list[str]:
    return [cls.__name__ for cls in type(obj).__mro__]


def _denoiser(pipe):
    """The pipeline's ``unet`` or ``transformer`` (unwrapped from ``torch.compile``), or ``None``."""
    from torch import nn

    for attribute in ("unet", "transformer"):
        module = getattr(pipe, attribute, None)
        if isinstance(module, nn.Module):
            return getattr(module, "_orig_mod", module)
    return None


def pipeline_family(pipe) -> ModelFamily | None:
    """The family of a pipeline object: by its class (or a base class: ``EtherStableDiffusionPipeline`` is SD), else by
    its denoiser's class (an SD inpainting or image-to-image pipeline holds an SD UNet; SDXL's UNet is told from SD's
    by its ``text_time`` added conditioning). ``None`` when neither says."""
    names = _class_names(pipe)
    for family in FAMILIES.values():
        if any(name == family.pipeline or name in family.class_names for name in names):
            return family
    denoiser = _denoiser(pipe)
    if denoiser is None:
        return None
    classes = _class_names(denoiser)
    found = [family for family in FAMILIES.values() if family.denoiser_class in classes]
    if len(found) > 1:  # SD and SDXL share UNet2DConditionModel
        xl = getattr(getattr(denoiser, "config", None), "addition_embed_type", None) == "text_time"
        found = [FAMILIES["sdxl" if xl else "sd"]]
    return found[0] if found else None


def check_supported_pipeline(pipe) -> None:
    """``UnsupportedModelError`` naming the pipeline's family and what is supported when its denoiser is of a model
    family ether-diffusion does not handle (PixArt's or Sana's transformer, ...); pipelines of a supported family, and
    objects without a denoiser (a text encoder alone), pass."""
    denoiser = _denoiser(pipe)
    if denoiser is None or pipeline_family(pipe) is not None:
        return
    name = type(pipe).__name__
    what = _KNOWN_OTHERS.get(name, f"a pipeline whose denoiser is a {type(denoiser).__name__}")
    raise UnsupportedModelError(
        f"this {name} is {what}, which ether-diffusion does not support; supported: {supported_families()}"
    )
