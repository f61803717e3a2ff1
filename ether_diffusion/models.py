"""Loading base models: one place that turns a model path (or nothing: the shipped tiny model) into a pipeline or
into the training components, with one clear error when the path is not a model.

    pipe = load_pipeline()                                   # assets/tiny-sd, offline
    pipe = load_pipeline("path/to/sd-1.5", EtherStableDiffusionPipeline)
    parts = load_components("path/to/sd-1.5")                # tokenizer, text encoder, VAE, UNet, noise scheduler
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["ModelLoadError", "SDComponents", "default_model", "load_components", "load_pipeline"]


class ModelLoadError(RuntimeError):
    """The base model could not be loaded; the message says what to pass instead."""


def default_model() -> str:
    """The shipped tiny Stable Diffusion (``assets/tiny-sd``)."""
    from .world.assets import default_model_path

    return str(default_model_path())


def _check_local(path: str) -> None:
    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~"))
    if looks_local and not (local / "model_index.json").is_file():
        raise ModelLoadError(
            f"'{path}' is not a diffusers model folder (no model_index.json); pass a folder saved "
            "with save_pretrained, a hub id, or leave the flag out to use the shipped tiny model"
        )


def _loading_failed(path: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load the base model '{path}': {err}. Without internet access pass a local "
        "diffusers folder (hub downloads need a connection)"
    )


def load_pipeline(model: str | Path | None = None, pipeline_class=None, scheduler: str | None = None, **kwargs):
    """A text-to-image pipeline of ``model`` (default: the shipped tiny model) with no safety checker and no
    progress bars. ``pipeline_class`` defaults to the model's family's (``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline``: see ``families.py``); ``scheduler="dpm"`` swaps in DPM-Solver++ (what validation
    samples with)."""
    from diffusers import DPMSolverMultistepScheduler

    if pipeline_class is None:
        from .families import model_family  # families reads model folders with this module's helpers

        pipeline_class = model_family(model, kwargs.get("revision")).pipeline_class()
    if model is None:
        from .world.assets import check_pipeline_folder

        model = str(check_pipeline_folder(default_model()))
        kwargs.setdefault("local_files_only", True)
    model = str(model)
    _check_local(model)
    try:
        pipe = pipeline_class.from_pretrained(model, safety_checker=None, requires_safety_checker=False, **kwargs)
    except (OSError, ValueError) as err:
        raise _loading_failed(model, err) from err
    if scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion 1.x/2.x model that training uses."""

    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object
    path: str

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor


def load_components(
    model: str | None = None, revision: str | None = None, variant: str | None = None, tokenizer: str | None = None
) -> SDComponents:
    """Tokenizer, text encoder, VAE, UNet and DDPM noise scheduler of ``model``, with a clear error if absent."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = str(model or default_model())
    _check_local(path)
    kwargs = dict(revision=revision)
    try:
        return SDComponents(
            tokenizer=CLIPTokenizer.from_pretrained(
                tokenizer or path, subfolder=None if tokenizer else "tokenizer", **kwargs
            ),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant, **kwargs),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, **kwargs),
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=variant, **kwargs),
            noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kwargs),
            path=path,
        )
    except (OSError, ValueError) as err:
        raise _loading_failed(path, err) from err
