"""The adapter file: one ``.safetensors`` with versioned JSON metadata, written atomically, read strictly.

Keys are ``<component>.<original module path>.<vector>``, e.g. ``unet.down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q.ether_u``; vectors are ``ether_u``/``ether_v`` (input side) and
``ether_u_out``/``ether_v_out`` (output side), each (n_blocks, width / n_blocks). The metadata holds:

- ``format`` = ``"ether-diffusion"`` and ``format_version`` (an integer, as a string);
- ``config``: JSON ``{component: EtherConfig.to_dict()}``;
- ``fingerprint``: JSON ``{component: {module path: [in_features, out_features]}}``, the adapted layers of the
  base model, so a file loaded into another architecture fails with the layers that differ;
- ``adapter_name``, ``base_model`` (informational), ``library_version``, and any ``extra`` string pairs;
- optionally ``model_family``: the model family the adapter was made for (``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``;
  see ``families.py``), so loading it into another family's pipeline says so instead of listing mismatched layers;
- optionally ``modules``: JSON ``{name: config}`` for small trained modules stored beside the vectors (the condition
  encoder of controllable synthesis), their tensors keyed ``<name>.<parameter>``. Their owner validates them; a
  plain adapter load refuses such a file rather than drop a part of it.

Never pickle: only safetensors is read or written.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .config import ADAPTABLE_COMPONENTS, EtherConfig, check_adapter_name
from .files import atomic_write
from .finite import check_finite
from .inject import (
    Target,
    adapter_configs,
    adapter_layers,
    adapter_state_dict,
    add_adapter_to_targets,
    check_can_add,
    find_targets,
    load_adapter_state_dict,
    restore_on_failure,
)
from .layers import EtherLayer, parameter_name
from .reflection import METHODS, unit_blocks

__all__ = [
    "DEFAULT_WEIGHT_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODEL_KEY_PREFIXES",
    "VECTOR_DTYPES",
    "AdapterFile",
    "AdapterFileError",
    "AdapterMismatchError",
    "load_adapter",
    "read_adapter_file",
    "resolve_adapter_path",
    "save_adapter",
    "weights_file_kind",
]

FORMAT_NAME = "ether-diffusion"
#: what a recorded ``model_family`` may look like (the names themselves are ``families.FAMILIES``', above this module)
FAMILY_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.\-]{0,31}")
FORMAT_VERSION = 1
DEFAULT_WEIGHT_NAME = "ether_adapter.safetensors"


class AdapterFileError(ValueError):
    """The file is not a valid ether-diffusion adapter (corrupt, truncated, wrong format or version)."""


class AdapterMismatchError(ValueError):
    """The adapter is valid but was made for a model with other layers or widths."""


@dataclass
class AdapterFile:
    """The parsed, validated content of an adapter file."""

    tensors: dict[str, torch.Tensor]
    configs: dict[str, EtherConfig]
    fingerprints: dict[str, dict[str, list[int]]]
    adapter_name: str | None = None
    base_model: str | None = None
    library_version: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    modules: dict[str, dict] = field(default_factory=dict)  # {name: {"config": dict, "state": {key: tensor}}}
    model_family: str | None = None  # the model family it was made for, when recorded
    path: Path | None = None  # the file it was read from

    def component_state(self, component: str) -> dict[str, torch.Tensor]:
        prefix = component + "."
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def num_parameters(self, component: str | None = None) -> int:
        return sum(v.numel() for k, v in self.tensors.items() if component is None or k.startswith(component + "."))


def resolve_adapter_path(path: str | os.PathLike, weight_name: str | None = None) -> Path:
    """A file, or a folder holding ``weight_name`` (default ``ether_adapter.safetensors``, else its only file)."""
    path = Path(path)
    if path.is_dir():
        if weight_name is not None:
            candidate = path / weight_name
        elif (path / DEFAULT_WEIGHT_NAME).is_file():
            candidate = path / DEFAULT_WEIGHT_NAME
        else:
            found = sorted(path.glob("*.safetensors"))
            if len(found) != 1:
                raise FileNotFoundError(
                    f"'{path}' holds {len(found)} .safetensors files ({[f.name for f in found]}); pass weight_name= "
                    f"to choose one (the default name is {DEFAULT_WEIGHT_NAME})"
                )
            candidate = found[0]
        path = candidate
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at '{path}': check the path (a .safetensors file or its folder)")
    return path


def _expected_shapes(config: EtherConfig, fingerprint: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    method = METHODS[config.method]
    shapes = {}
    for path, (in_width, out_width) in fingerprint.items():
        for side, width in (("input", in_width), ("output", out_width)):
            if side in config.sides:
                for vector in method.vector_names:
                    shapes[f"{path}.{parameter_name(vector, side)}"] = (config.n_blocks, width // config.n_blocks)
    return shapes


def _json_field(metadata: dict[str, str], key: str, path: Path):
    if key not in metadata:
        raise AdapterFileError(f"'{path}' has no '{key}' metadata; the file is incomplete or was not written by us")
    try:
        return json.loads(metadata[key])
    except (ValueError, RecursionError) as err:  # RecursionError: nested too deeply for Python's parser
        raise AdapterFileError(f"'{path}' has unreadable '{key}' metadata ({type(err).__name__}: {err})") from err


def _json_table(metadata: dict[str, str], key: str, path: Path) -> dict:
    """Metadata ``key`` as a JSON object whose keys are non-empty strings."""
    table = _json_field(metadata, key, path)
    if not isinstance(table, dict) or not all(isinstance(k, str) and k for k in table):
        raise AdapterFileError(
            f"'{path}' has invalid '{key}' metadata: a JSON object with non-empty keys was expected, got "
            f"{json.dumps(table)[:60]}"
        )
    return table


def _read_configs(metadata: dict[str, str], path: Path) -> dict[str, EtherConfig]:
    configs = {}
    for component, data in _json_table(metadata, "config", path).items():
        try:
            configs[component] = EtherConfig.from_dict(data)
        except ValueError as err:
            raise AdapterFileError(f"'{path}' has an invalid adapter config for {component!r}: {err}") from err
    return configs


def _read_fingerprints(
    metadata: dict[str, str], configs: dict[str, EtherConfig], path: Path
) -> dict[str, dict[str, list[int]]]:
    """``{component: {layer path: [in, out]}}``, checked against the configs (same components, n_blocks dividing
    every adapted width)."""
    fingerprints = _json_table(metadata, "fingerprint", path)
    if set(fingerprints) != set(configs):
        raise AdapterFileError(
            f"'{path}': config components {sorted(configs)} and fingerprint components {sorted(fingerprints)} disagree"
        )
    for component, layers in fingerprints.items():
        if not isinstance(layers, dict) or not layers:
            raise AdapterFileError(f"'{path}': the fingerprint of {component!r} lists no layers")
        config = configs[component]
        for layer, widths in layers.items():
            if not (
                layer
                and isinstance(widths, list)
                and len(widths) == 2
                and all(type(width) is int and width > 0 for width in widths)
            ):
                raise AdapterFileError(
                    f"'{path}': fingerprint entry {component} {layer!r} must be [in_features, out_features], two "
                    f"positive integers, not {json.dumps(widths)[:60]}"
                )
            for side, width in zip(("input", "output"), widths):
                if side in config.sides and width % config.n_blocks:
                    raise AdapterFileError(
                        f"'{path}': n_blocks={config.n_blocks} does not divide the {side} width {width} of "
                        f"{component} '{layer}'; the file is damaged or hand-edited"
                    )
    return fingerprints


#: dtypes a stored vector may have.
VECTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Key prefixes of an original (CompVis/LDM) Stable Diffusion checkpoint: UNet, VAE, text encoder(s).
MODEL_KEY_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")
# Key parts of LoRA files: diffusers/PEFT (lora_A/lora_B), kohya (lora_unet_, lora_te_, lora_down/lora_up), older
# diffusers attention processors (to_q_lora), LyCORIS (hada_w, lokr_w).
_LORA_MARKS = ("lora_a.", "lora_b.", "lora_down.", "lora_up.", "lora_unet_", "lora_te", "_lora.", "hada_w", "lokr_w")


def weights_file_kind(keys, metadata: dict[str, str]) -> str | None:
    """What a file of weights holds, by its tensor names and metadata: ``"adapter"`` (an ETHER adapter file),
    ``"model"`` (an original Stable Diffusion checkpoint), ``"lora"`` (a LoRA in any common format) or None.

    For messages that tell a user who gave one where another belongs which file it is."""
    if metadata.get("format") == FORMAT_NAME:
        return "adapter"
    keys = [k for k in keys if isinstance(k, str)]
    if any(k.startswith(MODEL_KEY_PREFIXES) for k in keys):
        return "model"
    if any(mark in k.lower() for k in keys for mark in _LORA_MARKS) or "ss_network_module" in metadata:
        return "lora"
    return None


def _all_finite_floats(tensors) -> bool:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.dtype not in VECTOR_DTYPES:
            return False
        by_dtype.setdefault(tensor.dtype, []).append(tensor.reshape(-1))
    return all(torch.isfinite(torch.cat(group)).all() for group in by_dtype.values())


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in ``data`` (an 8-byte little-endian header length, then the
    JSON header); call after safetensors has validated ``data``."""
    size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("the header's __metadata__ is not a table of strings")
    return metadata


def read_adapter_file(path: str | os.PathLike, weight_name: str | None = None) -> AdapterFile:
    """Read and validate an adapter file (or folder) without touching any model."""
    path = resolve_adapter_path(path, weight_name)
    # One read: header and tensors come from the same bytes, so a save replacing the file meanwhile cannot mix two
    # versions (safe_open reads the header through one open and maps the data through a second open by name).
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no adapter file at '{path}': it was removed while being read") from err
    except OSError as err:
        raise AdapterFileError(f"cannot read '{path}': {err.strerror or err}") from err
    try:
        tensors = load_safetensors(data)
        metadata = _safetensors_metadata(data)
    # Any failure while parsing the bytes means they are not a safetensors file (safetensors raises its own error,
    # or ValueError/KeyError/TypeError/RuntimeError from building tensors of a damaged header).
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, OverflowError) as err:
        raise AdapterFileError(
            f"'{path}' is not a readable safetensors file: it is truncated, corrupt or of another format ({err}). "
            "Save the adapter again or copy a good version of it."
        ) from err
    if metadata.get("format") != FORMAT_NAME:
        kind = weights_file_kind(tensors, metadata)
        if kind == "model":
            raise AdapterFileError(
                f"'{path}' is a Stable Diffusion model checkpoint, not an ETHER adapter: pass it as the base model "
                "(CLI: --model)"
            )
        what = "a LoRA file" if kind == "lora" else f"a safetensors file (metadata format={metadata.get('format')!r})"
        raise AdapterFileError(
            f"'{path}' is {what} but not an ether-diffusion adapter; LoRA files load with diffusers' load_lora_weights"
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        version = None
    if version != FORMAT_VERSION:
        hint = "upgrade ether-diffusion" if isinstance(version, int) and version > FORMAT_VERSION else "re-save it"
        raise AdapterFileError(
            f"'{path}' has adapter format_version {metadata.get('format_version')!r}; this library reads version "
            f"{FORMAT_VERSION}: {hint}"
        )
    configs = _read_configs(metadata, path)
    fingerprints = _read_fingerprints(metadata, configs, path)
    module_configs = _json_table(metadata, "modules", path) if "modules" in metadata else {}
    for name, config in module_configs.items():
        if name in configs or name in ADAPTABLE_COMPONENTS or not isinstance(config, dict):
            raise AdapterFileError(
                f"'{path}' has invalid 'modules' metadata: module {name!r} must have a name of its own and a JSON "
                "object as its config"
            )
    modules = {}
    for name, config in module_configs.items():
        prefix = name + "."
        state = {k[len(prefix) :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        if not state:
            raise AdapterFileError(f"'{path}' names a module {name!r} but holds none of its tensors")
        modules[name] = {"config": config, "state": state}
    if not configs and not modules:
        raise AdapterFileError(f"'{path}' holds neither adapter vectors nor modules")
    model_family = metadata.get("model_family") or None
    if model_family is not None and not FAMILY_NAME_PATTERN.fullmatch(model_family):
        raise AdapterFileError(
            f"'{path}' has invalid 'model_family' metadata {model_family[:40]!r}: a short name such as 'sdxl' or "
            "'flux' was expected; the file is damaged or hand-edited"
        )
    adapter_name = metadata.get("adapter_name") or None
    if adapter_name is not None:
        try:
            check_adapter_name(adapter_name)
        except ValueError as err:
            raise AdapterFileError(f"'{path}' stores an {err}") from err

    expected = {}
    for component, config in configs.items():
        for key, shape in _expected_shapes(config, fingerprints[component]).items():
            expected[f"{component}.{key}"] = shape
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = sorted(
        f"{k} {tuple(tensors[k].shape)} instead of {expected[k]}"
        for k in expected
        if k in tensors and tuple(tensors[k].shape) != expected[k]
    )
    problems = [
        f"{len(keys)} {what}: {', '.join(keys[:5])}{' …' if len(keys) > 5 else ''}"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("keys with the wrong shape", misshaped),
        )
        if keys
    ]
    if problems:
        raise AdapterFileError(f"'{path}' is inconsistent with its own metadata: " + "; ".join(problems))
    every = {**tensors, **{f"{n}.{k}": v for n, m in modules.items() for k, v in m["state"].items()}}
    if not _all_finite_floats(every.values()):  # one check per dtype; name the culprits only when it fails
        bad = sorted(
            f"{k} ({v.dtype})" if v.dtype not in VECTOR_DTYPES else f"{k} (non-finite)"
            for k, v in every.items()
            if v.dtype not in VECTOR_DTYPES or not torch.isfinite(v).all()
        )
        raise AdapterFileError(
            f"'{path}' holds vectors that are not finite float16/bfloat16/float32/float64 numbers: "
            + ", ".join(bad[:5])
            + (" …" if len(bad) > 5 else "")
        )

    reserved = {
        "format",
        "format_version",
        "config",
        "fingerprint",
        "adapter_name",
        "base_model",
        "library_version",
        "modules",
        "model_family",
    }
    return AdapterFile(
        tensors=tensors,
        configs=configs,
        fingerprints=fingerprints,
        adapter_name=adapter_name,
        base_model=metadata.get("base_model") or None,
        library_version=metadata.get("library_version"),
        extra={k: v for k, v in metadata.items() if k not in reserved},
        modules=modules,
        model_family=model_family,
        path=path,
    )


def fingerprint(model: nn.Module, adapter_name: str) -> dict[str, list[int]]:
    """``{module path: [in_features, out_features]}`` of the layers carrying ``adapter_name``."""
    return {
        path: [layer.in_features, layer.out_features]
        for path, layer in adapter_layers(model)
        if adapter_name in layer.ether_adapters
    }


def save_adapter(
    path: str | os.PathLike,
    components: dict[str, nn.Module],
    adapter_name: str = "default",
    base_model: str | None = None,
    extra: dict[str, str] | None = None,
    modules: dict[str, tuple[dict, dict[str, torch.Tensor]]] | None = None,
    model_family: str | None = None,
    recorded_name: str | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of each component (e.g. ``{"unet": unet}``) to one file, atomically.

    ``path`` may be a folder (the file is then ``<folder>/ether_adapter.safetensors``). ``modules`` adds trained
    modules as ``{name: (config dict, state dict)}`` (see the module docstring); ``model_family`` records the model
    family the components belong to (``families.FAMILIES``: "sd", "sdxl", "sd3", "flux"); ``recorded_name`` is the
    name the file gives the adapter when it is not ``adapter_name`` (a packed run's slot saves its job's name).
    """
    if model_family is not None and not FAMILY_NAME_PATTERN.fullmatch(str(model_family)):
        raise ValueError(f"model_family must be a short name such as 'sdxl' or 'flux', not {model_family!r}")
    path = Path(path)
    if path.is_dir():
        path = path / DEFAULT_WEIGHT_NAME
    tensors, configs, prints = {}, {}, {}
    for component, model in components.items():
        if adapter_name not in adapter_configs(model):
            continue
        configs[component] = adapter_configs(model)[adapter_name].to_dict()
        prints[component] = fingerprint(model, adapter_name)
        for key, value in adapter_state_dict(model, adapter_name).items():
            tensors[f"{component}.{key}"] = value.detach().to("cpu").contiguous().clone()
    if not tensors and not modules:
        raise KeyError(f"no component of {sorted(components)} has an adapter named {adapter_name!r}")
    for name, (_, state) in (modules or {}).items():
        if name in components or name in ADAPTABLE_COMPONENTS:
            raise ValueError(f"module name {name!r} clashes with a component name")
        for key, value in state.items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu", torch.float32).contiguous().clone()
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "config": json.dumps(configs, sort_keys=True),
        "fingerprint": json.dumps(prints, sort_keys=True),
        "adapter_name": recorded_name or adapter_name,
        "base_model": base_model or "",
        "library_version": __version__,
        **{str(k): str(v) for k, v in (extra or {}).items()},
    }
    if model_family is not None:
        metadata["model_family"] = str(model_family)
    if modules:
        metadata["modules"] = json.dumps({name: config for name, (config, _) in modules.items()}, sort_keys=True)
    # read_adapter_file refuses non-finite vectors: a file of them could never be loaded again
    advice = "save the adapter from before it diverged (an earlier checkpoint), or train with a lower learning rate"
    check_finite(tensors, "the adapter tensor", advice)
    with atomic_write(path, "the adapter") as tmp:  # a full disk: a one-line WriteError, the old file unchanged
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _check_fits(
    component: str, model: nn.Module, config: EtherConfig, prints: dict[str, list[int]], source: AdapterFile, path: Path
) -> list[Target]:
    """The targets of ``config`` in ``model``; ``AdapterMismatchError`` unless they are exactly the recorded layers,
    with the recorded widths, and ETHER can adapt every one of them."""
    targets = find_targets(model, config)
    wanted = {t.path: list(t.widths) for t in targets if t.problem is None}
    unsupported = [f"{t.path} ({t.problem})" for t in targets if t.problem is not None]
    missing = sorted(set(prints) - {t.path for t in targets})
    extra = sorted(set(wanted) - set(prints))
    widths = sorted(
        f"{p} (adapter {prints[p]}, model {wanted[p]})"
        for p in prints
        if p in wanted and list(wanted[p]) != list(prints[p])
    )
    problems = [
        f"{len(keys)} {what}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
        for what, keys in (
            ("target layers ETHER cannot adapt", unsupported),
            ("adapted layers this model lacks", missing),
            ("target layers the adapter lacks", extra),
            ("layers with other widths [in, out]", widths),
        )
        if keys
    ]
    if problems:
        made_for = f" (made for {source.base_model})" if source.base_model else ""
        raise AdapterMismatchError(
            f"'{path}'{made_for} does not fit this {component} ({type(model).__name__}): "
            + "; ".join(problems)
            + ". Load it into the base model it was trained on."
        )
    return targets


def _in_model_dtypes(
    state: dict[str, torch.Tensor], targets: list[Target], component: str, where: Path
) -> dict[str, torch.Tensor]:
    """``state`` cast to the dtype each vector will have in the model (its layer's weight dtype), and checked there.

    The file's own check runs in the file's dtype: 1e300 is a finite float64 but infinite as float32, and the length
    of a block of 1e30s overflows float32, so its direction ``u / |u|`` (all the transform uses) would be lost.
    Each block's direction, computed in the model's dtype as the layer will compute it, must equal the direction of
    the file's values up to that dtype's rounding.
    """
    dtypes = {}
    for target in targets:
        base = target.module.base_layer if isinstance(target.module, EtherLayer) else target.module
        dtypes[target.path] = base.weight.dtype
    groups: dict[tuple[torch.dtype, int], list[str]] = {}  # checked a group at a time: 512 vectors on SD-1.5
    for key, value in state.items():
        groups.setdefault((dtypes[key.rpartition(".")[0]], value.shape[-1]), []).append(key)
    cast, problems = {}, []
    for (dtype, _), keys in groups.items():
        rows = torch.cat([state[k] for k in keys])  # (blocks, b): every block of the group, in the file's dtype
        rows = rows.to(torch.promote_types(torch.promote_types(rows.dtype, dtype), torch.float32))
        converted = rows.to(dtype)
        # the reference direction, robust to any scale: blocks scaled to a largest magnitude of 1 first
        scaled = rows / rows.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
        error = (unit_blocks(converted).to(rows.dtype) - unit_blocks(scaled)).abs().amax(dim=-1)
        bad = ~(error <= 4 * torch.finfo(dtype).eps) | ~torch.isfinite(converted).all(dim=-1)  # NaN counts as bad
        sizes = [state[k].shape[0] for k in keys]
        cast.update(zip(keys, converted.split(sizes)))
        if not bad.any():
            continue
        for key, blocks, wrong, part in zip(keys, rows.split(sizes), bad.split(sizes), converted.split(sizes)):
            if not torch.isfinite(part).all():
                largest = blocks.abs().max().item()
                problems.append(f"{component}.{key} overflows {dtype} (largest magnitude {largest:.3g})")
            elif wrong.any():
                low, high = blocks.norm(dim=-1).aminmax()
                problems.append(
                    f"{component}.{key}: its directions u/|u| are lost in {dtype} (block lengths {low.item():.3g} "
                    f"to {high.item():.3g} overflow or underflow there)"
                )
    if problems:
        raise AdapterFileError(
            f"'{where}' holds vectors this {component} cannot use in its weights' dtype: "
            + "; ".join(problems[:3])
            + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
            + ". Re-save the adapter from a model in this dtype, or load it into a float32 model."
        )
    return cast


def load_adapter(
    path: str | os.PathLike | AdapterFile,
    components: dict[str, nn.Module],
    adapter_name: str | None = None,
    weight_name: str | None = None,
    accept_modules: bool = False,
) -> str:
    """Load an adapter file into the given components (e.g. ``{"unet": unet, "text_encoder": te}``).

    All or nothing. Everything is validated first (the file, then every component against the file's fingerprint),
    so a bad file or the wrong model raises one clear error and leaves the models as they were; should anything
    still fail while loading, every component is restored. The adapter is injected under ``adapter_name``
    (default: the name stored in the file) and activated. Returns the name used.
    """
    source = path if isinstance(path, AdapterFile) else read_adapter_file(path, weight_name)
    where = source.path or Path("<adapter>")
    if source.modules and not accept_modules:
        raise AdapterMismatchError(
            f"'{where}' also holds trained modules ({', '.join(sorted(source.modules))}) that a plain adapter load "
            "would drop: it is a controllable-synthesis file; load it with EtherControlPipeline.load_control_weights"
        )
    name = check_adapter_name(adapter_name or source.adapter_name or "default")
    absent = sorted(set(source.configs) - set(c for c, m in components.items() if m is not None))
    if absent:
        raise AdapterMismatchError(
            f"'{where}' adapts {absent}, which this pipeline does not have; load it into a pipeline with those parts"
        )
    plans = {}
    for component, config in source.configs.items():
        model = components[component]
        try:
            check_can_add(model, name)
        except (ValueError, RuntimeError) as err:
            raise type(err)(f"{component}: {err}") from err
        targets = _check_fits(component, model, config, source.fingerprints[component], source, where)
        state = _in_model_dtypes(source.component_state(component), targets, component, where)
        plans[component] = (model, config, targets, state)
    with contextlib.ExitStack() as undo:
        for model, _, _, _ in plans.values():
            undo.enter_context(restore_on_failure(model))
        for model, config, targets, state in plans.values():
            add_adapter_to_targets(model, targets, config, name, initialize=False)  # every vector is loaded next
            load_adapter_state_dict(model, name, state)
    return name
