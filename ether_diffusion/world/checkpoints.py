"""Pretraining checkpoints of the tiny world: tensors in safetensors, everything else in JSON, nothing pickled.

A checkpoint is a folder ``checkpoint-<step>``, complete or absent, by the package's convention
(``ether_diffusion/checkpoints.py``, which the training loop's checkpoints follow too): written into
``.checkpoint-<step>.partial``, marked complete with ``COMPLETE_MARKER``, renamed into place, and only then are the
oldest pruned. Inside:

    state.safetensors   every tensor of the state under its path in it: "unet/conv_in.weight",
                        "diff_opt/state/0/exp_avg", "emas/1/shadow/3", "generator"
    state.json          the state with each tensor replaced by {"$tensor": "<its key>"}; a tuple is written
                        {"$tuple": [...]} and a dict with keys other than strings {"$items": [[key, value], ...]},
                        so that an optimizer's state dict (int keys, tuples of betas) loads back exactly as it was

Loading opens the safetensors file and parses the JSON: no file's code ever runs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoints import COMPLETE_MARKER, latest_checkpoint, partial_folder, prune_checkpoints, write_failed

__all__ = ["TENSORS_FILE", "STATE_FILE", "find_checkpoint", "flatten_state", "load_checkpoint", "save_checkpoint",
           "unflatten_state"]  # fmt: skip

TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
_TENSOR, _TUPLE, _ITEMS = "$tensor", "$tuple", "$items"
_SCALARS = (str, int, float, bool, type(None))


def flatten_state(value, tensors: dict[str, torch.Tensor], path: str = ""):
    """``value`` as JSON, its tensors moved into ``tensors`` (on the CPU) under their paths in it."""
    if isinstance(value, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two tensors of the state have the path '{path}'")
        tensors[path] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: path}
    where = f"{path}/" if path else ""
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: flatten_state(v, tensors, f"{where}{k}") for k, v in value.items()}
        for key in value:
            if not isinstance(key, _SCALARS):
                raise TypeError(f"'{path}' has a key of type {type(key).__name__}, which JSON cannot hold")
        return {_ITEMS: [[k, flatten_state(v, tensors, f"{where}{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [flatten_state(v, tensors, f"{where}{i}") for i, v in enumerate(value)]
        return {_TUPLE: items} if isinstance(value, tuple) else items
    if isinstance(value, _SCALARS):
        return value
    raise TypeError(f"'{path}' is a {type(value).__name__}, which a checkpoint cannot hold without pickle")


def unflatten_state(value, tensors: dict[str, torch.Tensor]):
    """The inverse of ``flatten_state``: the JSON with its tensors put back."""
    if isinstance(value, list):
        return [unflatten_state(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TENSOR}:
        if value[_TENSOR] not in tensors:
            raise KeyError(f"the checkpoint's {STATE_FILE} names a tensor '{value[_TENSOR]}' missing from its tensors")
        return tensors[value[_TENSOR]]
    if set(value) == {_TUPLE}:
        return tuple(unflatten_state(v, tensors) for v in value[_TUPLE])
    if set(value) == {_ITEMS}:
        return {k: unflatten_state(v, tensors) for k, v in value[_ITEMS]}
    return {k: unflatten_state(v, tensors) for k, v in value.items()}


def save_checkpoint(output_dir: str | Path, step: int, state: dict, total_limit: int | None = None) -> Path:
    """Write ``state`` as ``output_dir/checkpoint-<step>`` (complete or absent), then keep the newest
    ``total_limit`` checkpoints (all when it is None or 0)."""
    output_dir = Path(output_dir)
    final, partial = partial_folder(output_dir, step)
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(flatten_state(state, tensors), indent=1)
    if partial.exists():
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True)
        save_file(tensors, str(partial / TENSORS_FILE))
        (partial / STATE_FILE).write_text(text + "\n")
        (partial / COMPLETE_MARKER).write_text(str(step))
    except (OSError, SafetensorError) as err:  # a full disk, a folder that cannot be written
        shutil.rmtree(partial, ignore_errors=True)
        raise write_failed(output_dir, step, err) from err
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    prune_checkpoints(output_dir, total_limit or None)
    return final


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> dict:
    """The state ``save_checkpoint`` wrote into ``folder``, its tensors on ``device``."""
    folder = Path(folder)
    tensors = load_file(str(folder / TENSORS_FILE), device=str(device))
    return unflatten_state(json.loads((folder / STATE_FILE).read_text()), tensors)


def find_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names: ``latest`` (None when ``output_dir`` holds no
    complete checkpoint: the run starts afresh) or a folder, which must be a complete checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file() or not (path / TENSORS_FILE).is_file():
        found = f"{path} is not a checkpoint folder" if not path.is_dir() else f"{path} holds no complete checkpoint"
        if (path / "state.pt").is_file():
            found += " (its state.pt is a pickle, which is never loaded; pretrain again)"
        raise FileNotFoundError(
            f"{found}: pass --resume_from_checkpoint latest, or a checkpoint-<step> folder of --output_dir"
        )
    return path
