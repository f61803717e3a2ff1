"""What a task trains on its frozen models: ETHER adapters (the product) or a PEFT peer (LoRA, OFT) for benchmarks.

Both expose the same small interface, so a task and the loop never branch on the method:

    adapters = EtherAdapters("subject", "sd")        # a task's default; the benchmarks pass PeftPeer("lora", ...)
    adapters.add({"unet": unet, "text_encoder": te}, {"unet": unet_cfg, "text_encoder": te_cfg})
    params = adapters.parameters()                   # fp32, requires_grad
    with adapters.disabled(): ...                    # the base model (step-0 baseline, class images)
    adapters.save(path, base_model, extra, modules)   # one .safetensors; ``modules``: extra trained modules
    adapters.load(path)                              # restore the vectors; returns the extra modules' states
    adapters.label                                   # "ETHER+", "LoRA r=4": how pages and model cards name them
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from ..config import METHOD_LABELS, EtherConfig
from ..files import atomic_write
from ..inject import adapter_parameters, enable_adapters, inject, load_adapter_state_dict
from ..io import read_adapter_file, save_adapter

__all__ = ["EtherAdapters", "PeftPeer"]


class EtherAdapters:
    """ETHER / ETHER+ adapters named ``name`` on one or more components."""

    kind = "ether"
    #: the saved file is an ETHER adapter file: ``load_ether_weights`` puts it into a fresh pipeline
    loads_into_pipelines = True

    def __init__(self, name: str, model_family: str | None = None, recorded_name: str | None = None):
        self.name = name
        self.model_family = model_family  # recorded in the file (families.FAMILIES)
        self.recorded_name = recorded_name  # the name the file gives the adapter, when not ``name`` (a pack's slot)
        self.models: dict[str, nn.Module] = {}
        self.configs: dict[str, EtherConfig] = {}

    @property
    def label(self) -> str:
        methods = sorted({config.method for config in self.configs.values()})
        return " + ".join(METHOD_LABELS.get(m, m) for m in methods) or "ETHER"

    def add(self, models: dict[str, nn.Module], configs: dict[str, EtherConfig]) -> None:
        for component, config in configs.items():
            inject(models[component], config, self.name)
            self.models[component] = models[component]
            self.configs[component] = config

    def parameters(self, components=None) -> list[nn.Parameter]:
        """The trained vectors (of ``components`` only, when given), in fp32 and requiring grad."""
        models = [m for c, m in self.models.items() if components is None or c in components]
        params = [p for model in models for p in adapter_parameters(model, self.name)]
        for p in params:  # the frozen model may run in half precision; the vectors train in fp32
            p.data = p.data.float()
            p.requires_grad_(True)
        return params

    @contextlib.contextmanager
    def disabled(self):
        for model in self.models.values():
            enable_adapters(model, False)
        try:
            yield
        finally:
            for model in self.models.values():
                enable_adapters(model, True)

    def save(self, path: Path, base_model: str | None = None, extra: dict | None = None, modules=None) -> Path:
        """The adapter file (``io.save_adapter``); ``modules``: ``{name: (config dict, state dict)}`` beside it."""
        return save_adapter(path, self.models, self.name, base_model=base_model, extra=extra, modules=modules,
                            model_family=self.model_family, recorded_name=self.recorded_name)  # fmt: skip

    def load(self, path: Path) -> dict[str, dict[str, torch.Tensor]]:
        source = read_adapter_file(path)
        for component, model in self.models.items():
            load_adapter_state_dict(model, self.name, source.component_state(component))
        return {name: module["state"] for name, module in source.modules.items()}


class PeftPeer:
    """A PEFT adapter with the settings of the papers' comparisons: LoRA r=4 (alpha 4) or OFT at PEFT's defaults."""

    #: the saved file holds PEFT state dicts: only the benchmarks read it back (``load``)
    loads_into_pipelines = False

    def __init__(self, method: str, name: str, seed: int):
        self.kind, self.name, self.seed = method, name, seed
        self.models: dict[str, nn.Module] = {}

    @property
    def label(self) -> str:
        return METHOD_LABELS[self.kind]

    def add(self, models: dict[str, nn.Module], configs: dict[str, EtherConfig]) -> None:
        import peft

        for component, config in configs.items():
            targets = list(config.target_suffixes)
            peft_config = (
                peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets)
                if self.kind == "lora"
                else peft.OFTConfig(target_modules=targets)
            )
            torch.manual_seed(self.seed)  # PEFT draws its initial weights from the global generator
            peft.inject_adapter_in_model(peft_config, models[component], adapter_name=self.name)
            self.models[component] = models[component]

    def _layers(self):
        from peft.tuners.tuners_utils import BaseTunerLayer

        for model in self.models.values():
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    yield module

    def parameters(self, components=None) -> list[nn.Parameter]:
        # the models are frozen before ``add``, so what requires grad now is exactly what PEFT added
        models = [m for c, m in self.models.items() if components is None or c in components]
        params = [p for model in models for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        return params

    @contextlib.contextmanager
    def disabled(self):
        layers = list(self._layers())
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    def save(self, path: Path, base_model: str | None = None, extra: dict | None = None, modules=None) -> Path:
        """PEFT's state dicts keyed ``<component>.<key>`` (and ``modules``' tensors) in one safetensors file."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        tensors = {
            f"{component}.{key}": value.detach().cpu().contiguous()
            for component, model in self.models.items()
            for key, value in get_peft_model_state_dict(model, adapter_name=self.name).items()
        }
        for name, (_, state) in (modules or {}).items():
            tensors.update({f"{name}.{k}": v.detach().cpu().contiguous() for k, v in state.items()})
        metadata = {"format": f"peft-{self.kind}", "components": json.dumps(sorted(self.models)),
                    "modules": json.dumps(sorted(modules or {})), "base_model": base_model or "",
                    **{k: str(v) for k, v in (extra or {}).items()}}  # fmt: skip
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    def load(self, path: Path) -> dict[str, dict[str, torch.Tensor]]:
        from peft.utils import set_peft_model_state_dict
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
            module_names = json.loads((handle.metadata() or {}).get("modules", "[]"))
        for component, model in self.models.items():
            prefix = component + "."
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            set_peft_model_state_dict(model, state, adapter_name=self.name)
        return {
            name: {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
            for name in module_names
        }
