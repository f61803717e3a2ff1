"""ether-diffusion: ETHER / ETHER+ hyperplane-reflection adapters for Stable Diffusion.

The core (math, layers, injection, the adapter file) needs only torch and safetensors; the diffusers pipeline
helpers are imported on first use, so ``import ether_diffusion`` stays light.
"""

import importlib
import logging
import sys
import types
from typing import TYPE_CHECKING

from ._version import __version__


class _NoImageProcessorFallback(logging.Filter):
    """transformers 5 says, on the first lookup of each image processor class without torchvision, that it falls back
    to the PIL one. diffusers' pipeline modules look up CLIP's and SigLIP's when they are imported, for the safety
    checker's feature extractor that this project never runs: every command printed two such lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoImageProcessorFallback())

if TYPE_CHECKING:  # the same names, for type checkers and the architecture test's import graph
    from .config import TARGET_PRESETS, EtherConfig, check_adapter_name  # noqa: F401
    from .inject import (  # noqa: F401
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
    from .io import AdapterFileError, AdapterMismatchError, load_adapter, read_adapter_file, save_adapter  # noqa: F401
    from .pipeline import (  # noqa: F401
        EtherLoaderMixin,
        EtherStableDiffusionPipeline,
        delete_ether_adapters,
        disable_ether,
        enable_ether,
        ether_mixed_batch,
        fuse_ether,
        get_active_ether_adapters,
        get_list_ether_adapters,
        load_ether_weights,
        save_ether_weights,
        set_ether_adapters,
        unfuse_ether,
        unload_ether_weights,
    )

#: what ``from ether_diffusion import X`` gives, and the module each comes from. Loaded on first use (PEP 562), so
#: ``import ether_diffusion`` costs nothing and the command line's ``--help`` answers before torch is imported; the
#: diffusers pipeline helpers stay out until a pipeline is used
_EXPORTS = {
    **dict.fromkeys(("TARGET_PRESETS", "EtherConfig", "check_adapter_name"), ".config"),
    **dict.fromkeys(
        (
            "adapter_names",
            "adapter_parameters",
            "count_parameters",
            "delete_adapter",
            "eject",
            "enable_adapters",
            "inject",
            "mark_only_adapters_trainable",
            "merge_adapters",
            "mixed_batch",
            "set_active_adapters",
            "set_merged_cache",
            "unmerge_adapters",
        ),
        ".inject",
    ),
    **dict.fromkeys(
        ("AdapterFileError", "AdapterMismatchError", "load_adapter", "read_adapter_file", "save_adapter"), ".io"
    ),
    **dict.fromkeys(
        (
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
        ),
        ".pipeline",
    ),
}


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ether_diffusion' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # once: later lookups find it directly
    return value


def __dir__():
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """The package's module type. ``inject`` is both a submodule and the function users import from the package;
    importing the submodule binds it on the package, which would hide the function. Here the name always gives the
    function (as the eager imports of earlier versions left it), and the submodule stays in ``sys.modules``."""

    @property
    def inject(self):
        return importlib.import_module(".inject", __name__).inject

    @inject.setter
    def inject(self, value):  # the import system binding the submodule: the function stays
        pass


sys.modules[__name__].__class__ = _Package


__all__ = ["__version__", *sorted(_EXPORTS)]
