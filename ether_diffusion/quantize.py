"""A frozen base model held in fewer bits under the ETHER adapters (``--base_quantization``), with torchao.

Only the base model's ``nn.Linear`` weights are quantised (attention and feed-forward projections: nearly all of a
UNet's or a transformer's parameters); convolutions, norms, embeddings and the adapters' own vectors stay as they
are, and the adapters train in float32 as always. A layer whose base weight is quantised applies its transforms to
the activations around the base layer's own ``F.linear`` (``layers.is_quantized``), so ETHER's product is unchanged;
it only cannot merge. What a run saves is the adapter: export it as a LoRA, or load it, into the unquantised model.

    int8    weight-only int8 per output channel (torchao ``Int8WeightOnlyConfig``): half of bf16, any device
    nf4     4-bit NormalFloat in blocks of 64 with double-quantised scales (torchao's ``NF4Tensor``, QLoRA's format):
            a quarter of bf16, any device; layers whose size is not a multiple of 64 × 256 stay as they are
    float8  weight-only float8 (torchao ``Float8WeightOnlyConfig``): needs a CUDA GPU with float8 (Ada, Hopper)
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

__all__ = ["QUANTIZATIONS", "check_quantization", "quantize_base", "stored_bytes"]

QUANTIZATIONS = ("none", "int8", "nf4", "float8")
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # torchao's defaults: a weight's size must be a multiple of their product


def check_quantization(kind: str) -> str | None:
    """Why ``kind`` cannot run here (a message naming what to install or drop), or None."""
    if kind == "none":
        return None
    if kind not in QUANTIZATIONS:
        return f"--base_quantization {kind!r} is not one of {', '.join(QUANTIZATIONS)}"
    if importlib.util.find_spec("torchao") is None:
        return (
            f"--base_quantization {kind} needs torchao (pip install torchao, or pip install "
            "'ether-diffusion[quantization]'); or drop the flag to train on the model's own weights"
        )
    if kind == "float8" and not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        return (
            "--base_quantization float8 needs a CUDA GPU with float8 support (Ada or Hopper); use int8 or nf4, "
            "which run on any device"
        )
    return None


def stored_bytes(tensor: torch.Tensor) -> int:
    """The bytes ``tensor`` takes: a quantised weight's inner tensors (its codes and scales), else
    ``numel × element_size`` (which a quantised weight reports as its original dtype's)."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return tensor.numel() * tensor.element_size()
    names, _ = tensor.__tensor_flatten__()
    return sum(stored_bytes(getattr(tensor, name)) for name in names)


def _plain_linears(model: nn.Module) -> list[nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` whose weight is a plain frozen tensor (adapted ones included: their base
    layer is such a Linear)."""
    return [m for m in model.modules() if type(m) is nn.Linear and type(m.weight) in (torch.Tensor, nn.Parameter)]


def quantize_base(model: nn.Module, kind: str) -> int:
    """Quantise the frozen ``nn.Linear`` weights of ``model`` in place as ``kind``; returns how many were."""
    problem = check_quantization(kind)
    if problem:
        raise ValueError(problem)
    if kind == "none":
        return 0
    linears = [m for m in _plain_linears(model) if not m.weight.requires_grad]
    if kind == "nf4":
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        done = 0
        for layer in linears:
            if layer.weight.numel() % (NF4_BLOCK * NF4_SCALER_BLOCK):
                continue
            layer.weight = nn.Parameter(to_nf4(layer.weight.detach(), NF4_BLOCK, NF4_SCALER_BLOCK), requires_grad=False)
            done += 1
        return done
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    chosen = set(map(id, linears))
    config = Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()
    quantize_(model, config, filter_fn=lambda module, name: id(module) in chosen)
    return len(linears)
