"""Controllable synthesis in diffusers pipelines: one file holds the condition encoder and the ETHER adapters.

    pipe = EtherControlPipeline.from_pretrained("assets/tiny-sd")
    pipe.load_control_weights("my-control/ether_control.safetensors")
    image = pipe("a red circle on a white background", image=segmentation_map).images[0]

The file is an adapter file (``ether_diffusion.io``) with the encoder stored as a module beside the vectors, so
both are validated together and can never be paired wrongly. The control goes to both classifier-free-guidance
branches; it is encoded once per call, not once per denoising step.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..inject import adapter_configs
from ..io import AdapterFile, AdapterFileError, load_adapter, read_adapter_file, save_adapter
from ..pipeline import EtherStableDiffusionPipeline, _components, delete_ether_adapters
from ..training.config import TaskKind
from .data import control_to_tensor
from .encoder import (
    ConditionEncoder,
    ConditionEncoderConfig,
    attach_condition_encoder,
    attached_encoder,
    detach_condition_encoder,
    set_condition,
)

__all__ = [
    "CONTROL_WEIGHT_NAME",
    "ENCODER_MODULE",
    "EtherControlPipeline",
    "encoder_from_file",
    "load_control_weights",
    "save_control_weights",
    "unload_control_weights",
]

CONTROL_WEIGHT_NAME = "ether_control.safetensors"
ENCODER_MODULE = "condition_encoder"


def save_control_weights(
    path: str | os.PathLike,
    unet,
    encoder: ConditionEncoder,
    adapter_name: str = "control",
    base_model: str | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write the encoder and ``unet``'s adapter ``adapter_name`` (if any: an encoder-only model has none) atomically."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / CONTROL_WEIGHT_NAME
    components = {"unet": unet} if adapter_name in adapter_configs(unet) else {}
    extra = {"task": str(TaskKind.CONTROL), **(extra or {})}
    modules = {ENCODER_MODULE: (encoder.config.to_dict(), encoder.state_dict())}
    return save_adapter(path, components, adapter_name, base_model=base_model, extra=extra, modules=modules)


def encoder_from_file(source: AdapterFile, where: str = "<file>") -> ConditionEncoder:
    """The condition encoder stored in ``source``, its config and every tensor checked."""
    if ENCODER_MODULE not in source.modules:
        raise AdapterFileError(
            f"'{where}' holds no condition encoder: it is a plain ETHER adapter; load it with load_ether_weights"
        )
    module = source.modules[ENCODER_MODULE]
    try:
        encoder = ConditionEncoder(ConditionEncoderConfig.from_dict(module["config"]))
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"'{where}' has an invalid condition encoder config: {err}") from err
    wanted = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in module["state"].items()}
    if wanted != found:
        missing, unexpected = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
        shapes = sorted(k for k in set(wanted) & set(found) if wanted[k] != found[k])
        raise AdapterFileError(
            f"'{where}': the condition encoder's tensors do not match its config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {shapes[:3]}); the file is damaged or hand-edited"
        )
    encoder.load_state_dict(module["state"])
    return encoder


def load_control_weights(pipe, path: str | os.PathLike, adapter_name: str | None = None, weight_name=None) -> str:
    """Load a control file into ``pipe``: validate everything, then attach the encoder and activate the adapter."""
    if attached_encoder(pipe.unet) is not None:
        raise ValueError("this pipeline already has a control model; call unload_control_weights() first")
    source = read_adapter_file(path, weight_name)
    encoder = encoder_from_file(source, str(path))
    encoder.check_fits(pipe.unet, pipe.vae_scale_factor)
    dtype = pipe.unet.dtype  # checked as it will run: 1e5 is finite in float32 and inf in float16
    overflow = sorted(k for k, v in encoder.state_dict().items() if not torch.isfinite(v.to(dtype)).all())
    if overflow:
        raise AdapterFileError(
            f"'{path}': condition encoder weights {', '.join(overflow[:3])} do not fit in this pipeline's {dtype} "
            "(they overflow to inf); load the pipeline in float32, or use a file trained for this precision"
        )
    name = load_adapter(source, _components(pipe), adapter_name, accept_modules=True)
    attach_condition_encoder(pipe.unet, encoder.to(pipe.unet.device, pipe.unet.dtype).eval())
    pipe._ether_control = (name, bool(source.configs))
    return name


def unload_control_weights(pipe) -> None:
    """Remove the condition encoder and its adapter; the pipeline is the base model again."""
    detach_condition_encoder(pipe.unet)
    name, has_adapter = getattr(pipe, "_ether_control", (None, False))
    if has_adapter:
        delete_ether_adapters(pipe, name)
    pipe._ether_control = (None, False)


class EtherControlPipeline(EtherStableDiffusionPipeline):
    """``EtherStableDiffusionPipeline`` that also takes ``image=<control>`` once a control file is loaded."""

    load_control_weights = load_control_weights
    unload_control_weights = unload_control_weights

    @property
    def condition_encoder(self) -> ConditionEncoder | None:
        return attached_encoder(self.unet)

    @torch.no_grad()
    def __call__(self, prompt=None, *args, image=None, **kwargs):
        encoder = attached_encoder(self.unet)
        if encoder is None:
            if image is not None:
                raise ValueError("image= needs a control model: call load_control_weights(path) first")
            return super().__call__(prompt, *args, **kwargs)
        if image is None:
            raise ValueError("this pipeline has a control model loaded: pass image=<control image> (or a list)")
        height = kwargs.get("height") or self.unet.config.sample_size * self.vae_scale_factor
        width = kwargs.get("width") or self.unet.config.sample_size * self.vae_scale_factor
        controls = image if isinstance(image, (list, tuple)) else [image]
        tensor = torch.stack(
            [control_to_tensor(c, height, width, encoder.config.conditioning_channels) for c in controls]
        )
        if isinstance(prompt, str) or prompt is None:
            prompts = 1 if prompt is not None or kwargs.get("prompt_embeds") is None else len(kwargs["prompt_embeds"])
        else:
            prompts = len(prompt)
        if len(tensor) not in (1, prompts):
            raise ValueError(f"{len(tensor)} control images for {prompts} prompts: give one, or one per prompt")
        tensor = tensor.expand(prompts, -1, -1, -1) if len(tensor) == 1 else tensor
        tensor = tensor.repeat_interleave(kwargs.get("num_images_per_prompt") or 1, dim=0)
        set_condition(self.unet, encoder(tensor.to(self.unet.device, next(encoder.parameters()).dtype)))
        try:
            return super().__call__(prompt, *args, **kwargs)
        finally:
            set_condition(self.unet, None)
