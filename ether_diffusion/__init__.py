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


class _Unheeded(logging.Filter):
    """Drops the log records of one library logger that carry ``text``: notes the libraries print on import about
    parts this project never uses, which every command repeated (no other record of those loggers is touched)."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_UNHEEDED = {
    # transformers 5, for each image processor looked up without torchvision: diffusers' pipeline modules look up
    # CLIP's and SigLIP's on import, for the safety checker's feature extractor this project never runs
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    # torchao (the --base_quantization extra), on import: its kernels built for other GPUs or Pythons do not load
    "torchao": "Failed to load ",
    # torch, when torchao registers its enums the old way
    "torch.utils._pytree": "is an Enum subclass and is now natively supported",
    # diffusers, on import with a torchao newer than it knows: only its loading of torchao-serialised checkpoints,
    # which this project does not do
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
}
for _logger, _text in _UNHEEDED.items():
    logging.getLogger(_logger).addFilter(_Unheeded(_text))

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
