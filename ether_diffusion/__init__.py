"""ether-diffusion: ETHER / ETHER+ hyperplane-reflection adapters for Stable Diffusion.

The core (math, layers, injection, the adapter file) needs only torch and safetensors; the diffusers pipeline
helpers are imported on first use, so ``import ether_diffusion`` stays light.
"""

from ._version import __version__
from .config import TARGET_PRESETS, EtherConfig, check_adapter_name
from .inject import (
    adapter_names,
    adapter_parameters,
    count_parameters,
    delete_adapter,
    eject,
    enable_adapters,
    inject,
    mark_only_adapters_trainable,
    merge_adapters,
    mixed_batch,
    set_active_adapters,
    set_merged_cache,
    unmerge_adapters,
)
from .io import AdapterFileError, AdapterMismatchError, load_adapter, read_adapter_file, save_adapter

_PIPELINE_EXPORTS = {
    "EtherStableDiffusionPipeline",
    "EtherLoaderMixin",
    "load_ether_weights",
    "save_ether_weights",
    "set_ether_adapters",
    "fuse_ether",
    "unfuse_ether",
    "unload_ether_weights",
    "enable_ether",
    "disable_ether",
    "delete_ether_adapters",
    "get_active_ether_adapters",
    "get_list_ether_adapters",
    "ether_mixed_batch",
}


def __getattr__(name):
    if name in _PIPELINE_EXPORTS:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'ether_diffusion' has no attribute {name!r}")


__all__ = [
    "TARGET_PRESETS",
    "__version__",
    "AdapterFileError",
    "AdapterMismatchError",
    "EtherConfig",
    "adapter_names",
    "adapter_parameters",
    "check_adapter_name",
    "count_parameters",
    "delete_adapter",
    "eject",
    "enable_adapters",
    "inject",
    "load_adapter",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "mixed_batch",
    "read_adapter_file",
    "save_adapter",
    "set_active_adapters",
    "set_merged_cache",
    "unmerge_adapters",
    *sorted(_PIPELINE_EXPORTS),
]
