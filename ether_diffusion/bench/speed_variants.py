"""What ``bench speed`` compares: the UNets it builds and the variants it trains on them.

A variant is a context manager that adapts a UNet, yields the trainable parameters, and leaves the UNet as it was:

    floor        the frozen UNet with one trainable scalar scaling each targeted layer's output (the whole backward
                 runs, nothing else trains): the cost any adapter adds is measured against it
    ether*       ETHER / ETHER+ two-sided of this library, n_blocks 1, 4, 16
    dense        ETHER as the official code computes it: dense (n, b, b) reflections, the weight rebuilt every forward
    hra ... boft PEFT's HRA, LoRA, OFT and BOFT on the same targets (``peer``: another library's method)

The models are the published UNets' configs with random weights (nothing is downloaded), or tiny ones for ``--quick``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TARGET_PRESETS, EtherConfig
from ..inject import eject, inject, mark_only_adapters_trainable

TARGETS = list(TARGET_PRESETS["unet-attention"])

# --- the models: configs of the published UNets (random weights), and tiny ones for --quick ---------------------

TINY_SD15_UNET = dict(
    sample_size=8,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
TINY_SDXL_UNET = dict(  # SDXL's structure (text_time conditioning, linear projections) at toy widths
    sample_size=8,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    norm_num_groups=1,
)


def build_unet(config: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with device:  # initialised where it runs: SDXL's 2.6 B weights are drawn on the GPU, not copied there
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype=dtype)


def conditioning(unet, batch: int, generator: torch.Generator, device, dtype) -> tuple[torch.Tensor, dict]:
    """Text context (B, 77, C), and for SDXL's text_time UNet the pooled text embedding and the six size/crop ids."""
    config = unet.config
    context = torch.randn(batch, 77, config.cross_attention_dim, generator=generator).to(device, dtype)
    if config.addition_embed_type != "text_time":
        return context, {}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]).repeat(batch, 1)
    added = {"text_embeds": torch.randn(batch, pooled, generator=generator), "time_ids": ids}
    return context, {"added_cond_kwargs": {k: v.to(device, dtype) for k, v in added.items()}}


def autocast(device, dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# --- the variants -------------------------------------------------------------------------------------------


def target_modules(unet: nn.Module) -> list[tuple[str, nn.Linear]]:
    config = EtherConfig(target_modules=TARGETS)
    return [(n, m) for n, m in unet.named_modules() if n and config.is_target(n) and isinstance(m, nn.Linear)]


def _set(model: nn.Module, path: str, module: nn.Module):
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextlib.contextmanager
def floor_variant(unet):
    """The frozen UNet with one trainable scalar scaling each targeted layer's output: the whole backward runs."""
    unet.requires_grad_(False)
    scales, handles = [], []
    for _, module in target_modules(unet):
        scale = nn.Parameter(torch.ones((), device=module.weight.device))
        scales.append(scale)
        handles.append(module.register_forward_hook(lambda m, i, out, s=scale: out * s.to(out.dtype)))
    try:
        yield scales
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def ether_variant(unet, method: str, n_blocks: int):
    inject(unet, EtherConfig(method=method, n_blocks=n_blocks, target_modules=TARGETS), "bench")
    params = mark_only_adapters_trainable(unet)
    for p in params:
        p.data = p.data.float()  # trainables in fp32 when the frozen model runs in low precision
    try:
        yield params
    finally:
        eject(unet)


class DenseEtherLinear(nn.Module):
    """ETHER as the official code computes it: dense (n, b, b) reflections and a rebuilt weight every forward."""

    def __init__(self, base: nn.Linear, n_blocks: int):
        super().__init__()
        self.base = base
        self.n_blocks = n_blocks
        self.u = nn.Parameter(torch.randn(n_blocks, base.in_features // n_blocks, device=base.weight.device))

    def forward(self, x):
        n, b = self.u.shape
        u = self.u / self.u.norm(dim=-1, keepdim=True)
        eye = torch.eye(b, device=u.device, dtype=u.dtype)
        reflections = eye - 2 * torch.einsum("ni,nj->nij", u, u)  # (n, b, b)
        weight = self.base.weight.view(-1, n, b).to(u.dtype)
        new_weight = torch.einsum("onb,nbc->onc", weight, reflections).reshape(self.base.weight.shape)
        return F.linear(x, new_weight.to(x.dtype), self.base.bias)


@contextlib.contextmanager
def dense_ether_variant(unet, n_blocks: int = 1):
    originals = target_modules(unet)
    unet.requires_grad_(False)
    wrappers = [DenseEtherLinear(m, n_blocks) for _, m in originals]
    for (path, _), wrapper in zip(originals, wrappers):
        _set(unet, path, wrapper)
    try:
        yield [w.u for w in wrappers]
    finally:
        for path, module in originals:
            _set(unet, path, module)


@contextlib.contextmanager
def peft_variant(unet, kind: str):
    import peft

    configs = {
        "hra": lambda: peft.HRAConfig(r=1, target_modules=TARGETS, init_weights=False),
        "lora": lambda: peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="gaussian"),
        "oft": lambda: peft.OFTConfig(target_modules=TARGETS),
        "boft": lambda: peft.BOFTConfig(target_modules=TARGETS),
    }
    originals = dict(target_modules(unet))
    unet.requires_grad_(False)
    peft.inject_adapter_in_model(configs[kind](), unet, adapter_name="bench")
    params = [p for n, p in unet.named_parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    try:
        yield params
    finally:
        for path, module in originals.items():
            _set(unet, path, module)


class Variant(NamedTuple):
    label: str
    make: Callable  # unet -> a context manager that yields the trainable parameters
    peer: bool = False  # another library's method


VARIANTS: dict[str, Variant] = {
    "floor": Variant("floor (frozen + 1 scalar/layer)", floor_variant),
    "ether1": Variant("ETHER n=1", lambda u: ether_variant(u, "ether", 1)),
    "ether4": Variant("ETHER n=4", lambda u: ether_variant(u, "ether", 4)),
    "ether16": Variant("ETHER n=16", lambda u: ether_variant(u, "ether", 16)),
    "etherplus1": Variant("ETHER+ two-sided n=1", lambda u: ether_variant(u, "ether_plus", 1)),
    "etherplus4": Variant("ETHER+ two-sided n=4", lambda u: ether_variant(u, "ether_plus", 4)),
    "dense": Variant("official-style dense ETHER n=1", lambda u: dense_ether_variant(u, 1)),
    "hra": Variant("PEFT HRA r=1", lambda u: peft_variant(u, "hra"), peer=True),
    "lora": Variant("PEFT LoRA r=4", lambda u: peft_variant(u, "lora"), peer=True),
    "oft": Variant("PEFT OFT (default)", lambda u: peft_variant(u, "oft"), peer=True),
    "boft": Variant("PEFT BOFT (default)", lambda u: peft_variant(u, "boft"), peer=True),
}
#: the GPU table's rows (docs/performance.md): the floor, ETHER, ETHER+ two-sided and the LoRA they are held against
ISSUE_VARIANTS = ["floor", "ether1", "etherplus1", "lora"]
