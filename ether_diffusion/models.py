"""Loading base models from wherever they live, and writing a model back in the original single-file layout.

One place turns a model path (or nothing: the shipped tiny model) into a pipeline or into the training components,
with one clear error (``ModelLoadError``) when the path is not a model::

    pipe = load_pipeline()                                             # assets/tiny-sd, offline
    pipe = load_pipeline("path/to/sd-1.5", EtherStableDiffusionPipeline)
    pipe = load_pipeline("dreamshaper_8.safetensors", config="sd15-configs/")   # one checkpoint file, offline
    parts = load_components("path/to/sd-1.5")       # tokenizer, text encoder, VAE, UNet, noise scheduler

``load_pipeline(model=None, pipeline_class=None, scheduler=None, config=None, original_config=None, **kwargs)``:
``model`` may be

- ``None``: the shipped tiny model (``assets/tiny-sd``), checked and loaded offline;
- a diffusers folder or a Hub id: ``pipeline_class.from_pretrained(model, **kwargs)``;
- a single checkpoint file (``.safetensors``, or ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin``), as most community
  models ship: ``pipeline_class.from_single_file(model, config=…, original_config=…, **kwargs)``. Such a file has
  the weights but not the pipeline's configuration, which diffusers fetches from the Hub. Offline, pass ``config``:
  a local diffusers folder of the same architecture (its ``model_index.json``, component ``config.json`` files,
  tokenizer and scheduler config; weights are not needed, e.g. a copy of ``stable-diffusion-v1-5`` or
  ``assets/tiny-sd``). ``original_config``, the checkpoint's original LDM YAML (``v1-inference.yaml``), is passed
  on to diffusers, which builds UNet and VAE from it but still needs the CLIP configs in the local Hugging Face
  cache. When the configuration cannot be found, ``ConfigNotFoundError`` says exactly what to pass.
  Pickled checkpoints (``.ckpt`` …) are first opened with ``torch.load(weights_only=True)``: a file holding
  anything but tensors and plain values raises ``UnsafeCheckpointError`` and no code of it runs. A file that is no
  model checkpoint (an ETHER adapter, a LoRA, other weights, not a checkpoint at all) raises ``NotAModelError``
  saying what it is, before diffusers reads it or asks the Hub; ``original_config`` is checked to be an LDM config.

``pipeline_class`` defaults to the model family's pipeline (pass ``EtherStableDiffusionPipeline``,
``EtherControlPipeline``, …); pipelines that take a safety checker get none; ``scheduler="dpm"`` swaps in
DPM-Solver++; progress bars are off; ``kwargs`` go to diffusers (``torch_dtype``, ``variant``, ``revision`` …). A model
whose weights are NaN or infinite raises ``finite.NonFiniteError`` naming one: it would draw black images.
``load_components(model=None, revision=None, variant=None, tokenizer=None, config=None, original_config=None)``
takes the same kinds of ``model``. Every failure is a ``ModelLoadError`` (or one of its subclasses above).

The other way::

    save_single_file(pipe, "model.safetensors", dtype=None)
    save_folder(pipe, "model/", dtype=None)

``save_single_file`` writes a Stable Diffusion 1.x pipeline (UNet, VAE, CLIP text encoder) as one ``.safetensors`` in
the original CompVis/LDM key layout (``model.diffusion_model.…``, ``first_stage_model.…``,
``cond_stage_model.transformer.…``) that A1111, Forge and ComfyUI load and ``from_single_file`` reads back;
``original_state_dict(pipe)`` gives the renamed tensors without writing. ``save_folder`` writes any pipeline as a
diffusers folder (``save_pretrained``), complete or not at all. Both write atomically (a file or folder already there
stays as it was if writing fails) and refuse weights that are not finite in the dtype written (``NonFiniteError``,
naming the weight): fp16 holds nothing beyond 65504, and a file of infinities would draw black images.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .assets import check_pipeline_folder
from .coexist import plain_modules
from .families import model_family
from .files import atomic_folder, atomic_write
from .finite import check_finite
from .io import weights_file_kind
from .sources import (
    PICKLE_SUFFIXES,
    SINGLE_FILE_SUFFIXES,
    ConfigNotFoundError,
    ModelLoadError,
    NotAModelError,
    UnsafeCheckpointError,
    check_local,
    default_model,
    is_single_file,
)

__all__ = [
    "SINGLE_FILE_SUFFIXES",
    "ConfigNotFoundError",
    "ModelLoadError",
    "NotAModelError",
    "SDComponents",
    "UnsafeCheckpointError",
    "default_model",
    "is_single_file",
    "load_components",
    "load_pipeline",
    "load_tiny_pipeline",
    "original_state_dict",
    "save_folder",
    "save_single_file",
]


def _loading_failed(path: str, err: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load the base model '{path}': {_relayed(err)}. Without internet access pass a local "
        "diffusers folder (hub downloads need a connection)"
    )


# Lines of torch's errors that advise loading with weights_only=False: that runs the file's code, so a message
# relayed from torch never carries them.
_UNSAFE_ADVICE = ("weights_only", "Weights only load failed", "Please file an issue", "Check the documentation")
# How torch.save's files begin: its zip archive, or its legacy pickle (protocol 2).
_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def _relayed(err: BaseException) -> str:
    """``err``'s message as one line, without torch's advice to load with weights_only=False."""
    lines = [line.strip() for line in str(err).splitlines()]
    text = " ".join(line for line in lines if line and not any(advice in line for advice in _UNSAFE_ADVICE))
    return text.strip(" :") or type(err).__name__


def _load_pickle(path: Path):
    """A pickled checkpoint, opened with the restricted unpickler (tensors and plain values only); raise otherwise."""
    with open(path, "rb") as handle:
        start = handle.read(16)
    if not start.startswith(_TORCH_FILE_STARTS):
        what = "is empty" if not start else f"starts with {start!r}"
        raise NotAModelError(
            f"'{path}' is not a readable PyTorch checkpoint: it {what}, not the zip archive or pickle that torch.save "
            "writes. Check the file (a download that saved an error page, or another format renamed)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the errors below say what matters
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        found = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        if not found:  # not a pickle the restricted unpickler can parse at all
            message = f"'{path}' is not a readable PyTorch checkpoint ({_relayed(err)}); check the file"
            raise ModelLoadError(message) from err
        raise UnsafeCheckpointError(
            f"'{path}' holds Python objects besides tensors, and unpickling them could run code, so it is not "
            f"opened ({found[0]}). Use a .safetensors version of the model, or convert this file only if you trust "
            "where it came from."
        ) from err
    except Exception as err:  # a damaged file: torch raises RuntimeError, EOFError, KeyError, ValueError …
        raise ModelLoadError(
            f"'{path}' is not a readable PyTorch checkpoint ({type(err).__name__}: {_relayed(err)}); check the file"
        ) from err


def _safetensors_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """The tensor names and metadata of a ``.safetensors`` file (its header only; no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            return list(handle.keys()), dict(handle.metadata() or {})
    except Exception as err:  # SafetensorError for a damaged header, OSError for an unreadable file
        raise ModelLoadError(
            f"'{path}' is not a readable safetensors file: it is truncated, corrupt or of another format "
            f"({_relayed(err)}); check the file"
        ) from err


def _check_model_file(path: Path, pipeline_class) -> None:
    """Refuse a file that is not a checkpoint of ``pipeline_class``'s model, naming what it is instead: an ETHER
    adapter, a LoRA, a pickle of something else, or weights without the denoiser the pipeline needs."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        state, metadata = _load_pickle(path), {}
        while isinstance(state, dict) and "state_dict" in state:  # as diffusers unwraps training checkpoints
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise NotAModelError(f"'{path}' holds a {type(state).__name__}, not a state dict of model weights")
        keys = [k for k in state if isinstance(k, str)]
    else:
        keys, metadata = _safetensors_header(path)
    kind = weights_file_kind(keys, metadata)
    if kind == "adapter":
        raise NotAModelError(
            f"'{path}' is an ETHER adapter file, not a model checkpoint: pass it as an adapter (load_ether_weights "
            "in Python) and the base model it was made for as --model"
        )
    if kind == "lora":
        raise NotAModelError(
            f"'{path}' is a LoRA file, not a model checkpoint: pass the base model as --model and load the LoRA into "
            "it (diffusers: pipe.load_lora_weights)"
        )
    if not keys:
        raise NotAModelError(f"'{path}' holds no tensors: it is not a model checkpoint")
    # UNet pipelines build their UNet from the original layout's model.diffusion_model.* (diffusers' conversion reads
    # nothing else); SD3 and Flux transformers also come without that prefix.
    if "unet" in inspect.signature(pipeline_class.__init__).parameters and not any(
        k.startswith(UNET_PREFIX) for k in keys
    ):
        raise NotAModelError(
            f"'{path}' holds no Stable Diffusion weights (no {UNET_PREFIX}* keys among its {len(keys)} tensor(s), "
            f"such as '{keys[0]}'): pass a full checkpoint (UNet, VAE and text encoder in one file) or a diffusers "
            "folder"
        )


def _check_original_config(path: Path) -> None:
    """Refuse a ``--original_config`` that is not an original LDM config, naming the problem (diffusers would fail
    deep inside its conversion)."""
    import yaml

    hint = "pass the .yaml the checkpoint came with (v1-inference.yaml for SD 1.x)"
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or _relayed(err)
        message = f"'{path}' is not an original LDM config: its YAML does not parse ({problem}{where}); {hint}"
        raise ModelLoadError(message) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"cannot read the original config '{path}' ({err}); {hint}") from err
    model = config.get("model") if isinstance(config, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(params, dict):
        raise ModelLoadError(f"'{path}' is not an original LDM config: it has no model: params: section; {hint}")
    missing = [k for k in ("first_stage_config",) if k not in params]
    if not ({"unet_config", "network_config"} & set(params)):
        missing.insert(0, "unet_config")
    if missing:
        raise ModelLoadError(
            f"'{path}' is not an original LDM config of a whole model: model.params has no {', '.join(missing)}; {hint}"
        )


def _config_hint(path: Path) -> str:
    return (
        f"'{path}' is a single-file checkpoint: it holds the weights but not the pipeline's configuration, which "
        "diffusers fetches from the Hugging Face Hub, and that failed (offline, or no such model there). Pass "
        "config=FOLDER (CLI: --config FOLDER), a local diffusers folder of the same architecture (model_index.json, "
        "the components' config.json, tokenizer and scheduler config; no weights needed, e.g. a copy of "
        "stable-diffusion-v1-5 or assets/tiny-sd for the tiny model). original_config=FILE.yaml (CLI: "
        "--original_config), the checkpoint's original LDM config such as v1-inference.yaml, builds the UNet and VAE "
        "from it, but offline diffusers then still needs the CLIP text encoder's config in the local Hugging Face "
        "cache"
    )


def _safety_off(pipeline_class) -> dict:
    params = inspect.signature(pipeline_class.__init__).parameters
    return {k: v for k, v in (("safety_checker", None), ("requires_safety_checker", False)) if k in params}


def _from_single_file(pipeline_class, source: Path, config, original_config, kwargs: dict):
    if not source.is_file():
        raise ModelLoadError(f"no checkpoint file at '{source}'")
    if config is not None and not (Path(config) / "model_index.json").is_file():
        raise ModelLoadError(
            f"config '{config}' is not a diffusers folder (no model_index.json): pass the folder that holds "
            "model_index.json and the component subfolders"
        )
    if original_config is not None and not Path(original_config).is_file():
        raise ModelLoadError(f"no original config at '{original_config}' (a .yaml file such as v1-inference.yaml)")
    _check_model_file(source, pipeline_class)  # before any download or conversion: a wrong file fails at once
    if original_config is not None:
        _check_original_config(Path(original_config))
        if config is None:
            kwargs.setdefault("local_files_only", True)  # diffusers' path that builds components from the YAML
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        return pipeline_class.from_single_file(
            str(source),
            config=None if config is None else str(config),
            original_config=None if original_config is None else str(original_config),
            **kwargs,
        )
    except SingleFileComponentError as err:  # a component the file lacks, which diffusers cannot build without it
        missing = _relayed(err).split(" Please ")[0]  # the rest is diffusers' code to pass the component yourself
        raise ModelLoadError(
            f"'{source}' does not hold a whole {pipeline_class.__name__} ({missing}): pass a checkpoint with all of "
            "its components in one file, or a diffusers folder"
        ) from err
    except (KeyError, TypeError, AttributeError) as err:  # diffusers' conversion did not find in the YAML what it reads
        if original_config is None:
            raise
        raise ModelLoadError(
            f"'{original_config}' does not describe the model of '{source}' (diffusers' conversion failed: "
            f"{type(err).__name__}: {_relayed(err)}); pass the .yaml the checkpoint came with"
        ) from err
    except (OSError, ValueError) as err:  # the Hub's errors (offline, not found) are OSError / ValueError
        if config is not None:
            raise _loading_failed(str(source), err) from err
        raise ConfigNotFoundError(f"{_config_hint(source)}. ({type(err).__name__}: {_relayed(err)})") from err


def load_pipeline(
    model: str | os.PathLike | None = None,
    pipeline_class=None,
    scheduler: str | None = None,
    config: str | os.PathLike | None = None,
    original_config: str | os.PathLike | None = None,
    **kwargs,
):
    """A text-to-image pipeline of ``model`` (default: the shipped tiny model): a folder, a Hub id or a single
    checkpoint file; no safety checker, no progress bars (see the module docstring). ``pipeline_class`` defaults to
    the model's family's (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``: see ``families.py``)."""
    from diffusers import DPMSolverMultistepScheduler

    if pipeline_class is None:
        pipeline_class = model_family(model, kwargs.get("revision"), config).pipeline_class()
    kwargs = {**_safety_off(pipeline_class), **kwargs}
    if model is None:
        if config is not None or original_config is not None:
            raise ModelLoadError("config/original_config describe a single checkpoint file: pass that model too")
        model = str(check_pipeline_folder(default_model()))
        kwargs.setdefault("local_files_only", True)
    with quiet_loading():
        if is_single_file(model):
            pipe = _from_single_file(pipeline_class, Path(model), config, original_config, kwargs)
        else:
            model = str(model)
            if config is not None or original_config is not None:
                raise ModelLoadError(
                    f"config/original_config describe a single checkpoint file; '{model}' is a diffusers folder or "
                    "hub id and carries its own configuration: drop them"
                )
            check_local(model)
            try:
                pipe = pipeline_class.from_pretrained(model, **kwargs)
            except (OSError, ValueError) as err:
                raise _loading_failed(model, err) from err
    # A checkpoint of NaN or infinite weights (a fuse that overflowed fp16 wrote them) loads without complaint and
    # draws black images: refused here, naming the first such weight.
    weights = {f"{name}.{key}": value for name, m in pipe.components.items() if isinstance(m, nn.Module)
               for key, value in m.named_parameters()}  # fmt: skip
    check_finite(weights, "the weight", "use a good copy of the model", outcome=f"'{model}' is damaged")
    if scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def quiet_loading():
    """No loading bars from diffusers ("Loading pipeline components") or transformers ("Loading weights") inside: a
    command's output is its own lines. The bars' previous settings come back after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _ in enabled:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was in enabled:
            if was:
                module.enable_progress_bar()


def load_tiny_pipeline(path: str | os.PathLike | None = None, device: str = "cpu"):
    """A tiny-world Stable Diffusion (the shipped ``assets/tiny-sd`` by default) as a ``StableDiffusionPipeline``,
    loaded offline after ``check_pipeline_folder``: a missing or corrupt file raises ``AssetError`` naming it."""
    path = check_pipeline_folder(path if path is not None else default_model())
    return load_pipeline(str(path), local_files_only=True).to(device)


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
    model: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    tokenizer: str | None = None,
    config: str | os.PathLike | None = None,
    original_config: str | os.PathLike | None = None,
) -> SDComponents:
    """Tokenizer, text encoder, VAE, UNet and DDPM noise scheduler of ``model`` (a folder, hub id or single
    checkpoint file), with a clear error if absent."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = str(model or default_model())
    if is_single_file(path):
        pipe = load_pipeline(path, config=config, original_config=original_config, revision=revision)
        return SDComponents(
            tokenizer=CLIPTokenizer.from_pretrained(tokenizer) if tokenizer else pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            vae=pipe.vae,
            unet=pipe.unet,
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            path=path,
        )
    if config is not None or original_config is not None:
        raise ModelLoadError(f"config/original_config describe a single checkpoint file, and '{path}' is not one")
    check_local(path)
    kwargs = dict(revision=revision)
    with quiet_loading():
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


# --- diffusers → original (CompVis/LDM) layout ------------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _renamed(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _unet_key(key: str, per_level: int, up_has_attention: list[bool]) -> str:
    """``down_blocks.1.attentions.0.proj_in.weight`` → ``input_blocks.4.1.proj_in.weight`` (SD 1.x UNet layout).

    LDM numbers the UNet's blocks flat: ``input_blocks`` hold, per level, ``layers_per_block`` (resnet, attention)
    pairs then a downsampler; ``output_blocks`` hold ``layers_per_block + 1`` pairs per level, the upsampler
    sitting in the last pair (index 2 when the pair has an attention, else 1)."""
    top = _renamed(key, _UNET_TOP)
    if top != key:
        return top
    parts = key.split(".")
    step = per_level + 1
    if parts[0] in ("down_blocks", "up_blocks"):
        level, kind = int(parts[1]), parts[2]
        blocks = "input_blocks" if parts[0] == "down_blocks" else "output_blocks"
        first = 1 + level * step if blocks == "input_blocks" else level * step
        if kind in ("resnets", "attentions"):
            index, rest = int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                return f"{blocks}.{first + index}.0.{_renamed(rest, _UNET_RESNET)}"
            return f"{blocks}.{first + index}.1.{rest}"
        rest = ".".join(parts[5:])  # "downsamplers.0.conv.<rest>" / "upsamplers.0.conv.<rest>"
        if kind == "downsamplers":
            return f"input_blocks.{(level + 1) * step}.0.op.{rest}"
        if kind == "upsamplers":
            return f"output_blocks.{level * step + per_level}.{2 if up_has_attention[level] else 1}.conv.{rest}"
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{0 if index == 0 else 2}.{_renamed(rest, _UNET_RESNET)}"
        if kind == "attentions":
            return f"middle_block.1.{rest}"
    raise KeyError(f"UNet key '{key}' has no place in the SD 1.x single-file layout")


def _vae_key(key: str, levels: int) -> str:
    """``decoder.up_blocks.0.resnets.1.conv1.weight`` → ``decoder.up.2.block.1.conv1.weight`` (LDM numbers the
    decoder's levels from the bottom)."""
    parts = key.split(".")
    half = parts[0]  # encoder / decoder, or quant_conv / post_quant_conv (same names)
    if half not in ("encoder", "decoder"):
        return key
    if parts[1] in ("down_blocks", "up_blocks"):
        level = int(parts[2]) if half == "encoder" else levels - 1 - int(parts[2])
        direction = "down" if half == "encoder" else "up"
        if parts[3] == "resnets":
            rest = _renamed(".".join(parts[5:]), _VAE_RESNET)
            return f"{half}.{direction}.{level}.block.{parts[4]}.{rest}"
        sampler = "downsample" if half == "encoder" else "upsample"
        return f"{half}.{direction}.{level}.{sampler}.{'.'.join(parts[5:])}"  # "*samplers.0.conv.<rest>"
    if parts[1] == "mid_block":
        rest = ".".join(parts[4:])
        if parts[2] == "resnets":
            return f"{half}.mid.block_{int(parts[3]) + 1}.{_renamed(rest, _VAE_RESNET)}"
        return f"{half}.mid.attn_1.{_renamed(rest, _VAE_ATTENTION)}"
    return f"{half}.{_renamed('.'.join(parts[1:]), {'conv_norm_out': 'norm_out'})}"


def _check_sd1(pipe) -> None:
    unet, text_encoder = getattr(pipe, "unet", None), getattr(pipe, "text_encoder", None)
    problems = []
    if unet is None or getattr(pipe, "vae", None) is None or text_encoder is None:
        problems.append("it needs a unet, a vae and a text_encoder")
    elif getattr(pipe, "text_encoder_2", None) is not None:
        problems.append("it has a second text encoder (SDXL)")
    elif type(text_encoder).__name__ != "CLIPTextModel":
        problems.append(f"its text encoder is a {type(text_encoder).__name__}, not a CLIPTextModel")
    elif unet.config.use_linear_projection or not isinstance(unet.config.layers_per_block, int):
        problems.append("its UNet is SD 2.x-style (linear projections: the original layout needs OpenCLIP keys)")
    if problems:
        raise ValueError(
            f"save_single_file writes the Stable Diffusion 1.x layout; this {type(pipe).__name__} does not fit: "
            + "; ".join(problems)
            + ". Save it as a diffusers folder instead (save_pretrained, or ether-diffusion fuse --output_dir)"
        )


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict under the original names (ETHER wrappers as the model computes: see coexist.py)."""
    with plain_modules(model):
        return {k: v.detach() for k, v in model.state_dict().items()}


def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """A Stable Diffusion 1.x pipeline's weights under the original single-file names (tensors shared, not copied)."""
    _check_sd1(pipe)
    unet, vae = pipe.unet, pipe.vae
    up_has_attention = ["CrossAttn" in t for t in unet.config.up_block_types]
    unet_state, vae_state = _plain_state(unet), _plain_state(vae)
    # transformers >= 5.6 flattened CLIPTextModel (``embeddings.…``); the original layout keeps ``text_model.…``
    text_state = {
        k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in _plain_state(pipe.text_encoder).items()
    }
    state = {}
    for key, value in unet_state.items():
        state[UNET_PREFIX + _unet_key(key, unet.config.layers_per_block, up_has_attention)] = value
    levels = len(vae.config.block_out_channels)
    for key, value in vae_state.items():
        name = _vae_key(key, levels)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1×1 convolutions
        state[VAE_PREFIX + name] = value
    for key, value in text_state.items():
        state[TEXT_PREFIX + key] = value
    if len(state) != len(unet_state) + len(vae_state) + len(text_state):
        raise RuntimeError("two weights were given the same single-file name; nothing was written")
    position_ids = TEXT_PREFIX + "text_model.embeddings.position_ids"
    if position_ids not in state:  # original checkpoints carry it; newer transformers keep it out of state
        state[position_ids] = torch.arange(pipe.text_encoder.config.max_position_embeddings)[None]
    return state


def _overflow_advice(dtype: torch.dtype) -> str:
    """What to do about weights that are not finite as written in ``dtype``."""
    wider = "write them in fp32 or bf16 (CLI: --dtype fp32), or " if dtype == torch.float16 else ""
    return f"{wider}fuse the adapters at a smaller strength"


def save_folder(pipe, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``pipe`` as a diffusers folder (``save_pretrained``, safetensors), atomically; ``dtype`` casts it first."""
    path = Path(path)
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, nn.Module)}
    weights = {f"{name}.{k}": v for name, m in modules.items() for k, v in _plain_state(m).items()}
    check_finite(weights, "the weight", _overflow_advice(dtype or pipe.dtype), dtype)
    if dtype is not None:
        pipe.to(dtype=dtype)
    with atomic_folder(path, what="the model") as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
    return path


def save_single_file(pipe, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``pipe`` (SD 1.x) as one original-layout ``.safetensors``, atomically; ``dtype`` casts float weights."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"write the checkpoint to a .safetensors file, not '{path}'")
    state = original_state_dict(pipe)
    check_finite(state, "the weight", _overflow_advice(dtype or pipe.unet.dtype), dtype)
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).to("cpu").contiguous()
        for k, v in state.items()
    }
    with atomic_write(path, "the checkpoint") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    return path
