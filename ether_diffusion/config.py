"""EtherConfig: what to adapt and how, with named target presets and a versioned JSON form."""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
from dataclasses import dataclass, field

import torch

from .reflection import METHODS

__all__ = [
    "ADAPTABLE_COMPONENTS",
    "DENOISER_COMPONENTS",
    "ADAPTER_NAME_PATTERN",
    "CONFIG_FORMAT_VERSION",
    "DTYPES",
    "METHOD_LABELS",
    "SIDES",
    "TARGET_PRESETS",
    "EtherConfig",
    "check_adapter_name",
    "matches_module_path",
]

CONFIG_FORMAT_VERSION = 1

SIDES = ("input", "output")

#: The pipeline components adapters can live on, declared once (as diffusers' ``_lora_loadable_modules``): pipelines
#: expose them as attributes, adapter files key their tensors by them. The denoiser is a ``unet`` (SD 1.x/2.x, SDXL) or
#: a ``transformer`` (SD3, Flux); SD3 has three text encoders (two CLIP, T5), Flux two (CLIP, T5).
ADAPTABLE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")

#: The components that denoise latents: they see one row per image (times two under classifier-free guidance), where
#: text encoders see one row per prompt.
DENOISER_COMPONENTS = ("unet", "transformer")

#: How methods are named on pages, grids, tables and model cards (ETHER's and the PEFT peers benchmarks train).
METHOD_LABELS = {"ether": "ETHER", "ether_plus": "ETHER+", "lora": "LoRA r=4", "oft": "OFT"}

#: The dtype names flags and files use (``--dtype``, ``--mixed_precision``, ``--prior_generation_precision``).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The attention projections of an MMDiT block (SD3's JointTransformerBlock, Flux's double-stream block): the image
# stream's q/k/v/out and the text (context) stream's add_q/k/v_proj and to_add_out. Flux's single-stream blocks have
# q/k/v only: their attention output goes through proj_out together with the MLP (a name the model's final output layer
# shares, so a suffix cannot pick it alone).
_MMDIT_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

#: Named target lists. Entries are dotted module-path suffixes ("to_out.0" matches "...attn1.to_out.0").
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    # The paper's subject-driven setting: q/k/v/out of every UNet attention (self and cross).
    "unet-attention": ("to_q", "to_k", "to_v", "to_out.0"),
    # The paper's controllable setting: attention plus the GEGLU input projection of each feed-forward.
    "unet-attention-ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"),
    # Parts of the subject-driven setting, for ablations (which attention drifts the prompt?). In diffusers' UNets
    # attn1 is self-attention (image tokens), attn2 cross-attention (queries from the image, keys and values from
    # the text tokens).
    "unet-self-attention": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"),
    "unet-cross-attention-q-out": ("attn2.to_q", "attn2.to_out.0"),
    "unet-cross-attention-kv": ("attn2.to_k", "attn2.to_v"),
    # Every attention projection that reads image tokens: the paper's targets less cross-attention's keys and values
    # (which transform the text tokens, every prompt's).
    "unet-attention-image": (
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_out.0",
    ),
    # CLIP text encoder attention.
    "text-encoder-attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
    # SD3 (SD3Transformer2DModel): every joint block's image and context attention projections (and SD3.5's second,
    # image-only attention, attn2, where a block has one).
    "sd3-attention": _MMDIT_ATTENTION,
    # Flux (FluxTransformer2DModel): the double-stream blocks' image and context projections, the single-stream
    # blocks' q/k/v.
    "flux-attention": _MMDIT_ATTENTION,
    # diffusers' Flux LoRA default (train_dreambooth_lora_flux.py): attention plus both streams' feed-forwards and the
    # single-stream blocks' MLP input.
    "flux-attention-ff": (
        *_MMDIT_ATTENTION,
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
        "proj_mlp",
    ),
}

#: The one rule for adapter names (modules, files, the studio): safe as a module key and as a file name.
ADAPTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")


def check_adapter_name(name: str) -> str:
    """Return ``name`` if it is a valid adapter name, else raise ``ValueError`` saying what is allowed."""
    if not isinstance(name, str) or not ADAPTER_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"invalid adapter name {name!r}: use 1-64 letters (A-Z, a-z), digits, '_' or '-', starting with a letter "
            "or digit (no spaces, dots or slashes)"
        )
    return name


def _strings(values) -> bool:
    """A list or tuple of non-empty strings (not a string, whose characters would be taken one by one)."""
    return isinstance(values, (list, tuple)) and all(isinstance(v, str) and v for v in values)


_DEFAULT_SIDES = {"ether": ("input",), "ether_plus": ("input", "output")}


def matches_module_path(path: str, pattern: str) -> bool:
    """True when ``pattern`` is a run of whole dotted components of ``path`` ("attn1" matches "a.attn1.to_q")."""
    return f".{pattern}." in f".{path}."


@dataclass
class EtherConfig:
    """How an ETHER adapter is built.

    Args:
        method: ``"ether"`` (one reflection per block, ~0.1M parameters on SD-1.5) or ``"ether_plus"``
            (the relaxed ``I - ûûᵀ + v̂v̂ᵀ``, starts at the identity).
        n_blocks: number of diagonal blocks; must divide the width of every adapted side.
        sides: ``("input",)``, ``("output",)`` or both. ``None`` picks the paper's default: input for ETHER,
            both (two-sided) for ETHER+.
        target_modules: a preset name from ``TARGET_PRESETS`` or a list of dotted module-path suffixes.
        exclude_modules: dotted path fragments to skip (e.g. ``["mid_block"]``, ``["down_blocks.0"]``).
        init_seed: seed of the initial vectors; each layer draws from its own stream derived from its path.
    """

    method: str = "ether_plus"
    n_blocks: int = 1
    sides: tuple[str, ...] | None = None
    target_modules: str | list[str] = "unet-attention"
    exclude_modules: list[str] = field(default_factory=list)
    init_seed: int = 0

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"unknown ETHER method {self.method!r}; choose one of {sorted(METHODS)}")
        if not isinstance(self.n_blocks, int) or isinstance(self.n_blocks, bool) or self.n_blocks < 1:
            raise ValueError(f"n_blocks must be a positive integer, got {self.n_blocks!r}")
        sides = _DEFAULT_SIDES[self.method] if self.sides is None else self.sides
        if (
            isinstance(sides, str)
            or not isinstance(sides, (list, tuple, set, frozenset))
            or not sides
            or not all(isinstance(side, str) and side in SIDES for side in sides)
            or len(set(sides)) != len(sides)
        ):
            raise ValueError(f"sides must be a non-empty subset of {SIDES}, got {self.sides!r}")
        self.sides = tuple(side for side in SIDES if side in sides)
        if isinstance(self.target_modules, str):
            if self.target_modules not in TARGET_PRESETS:
                raise ValueError(
                    f"unknown target preset {self.target_modules!r}; presets: {sorted(TARGET_PRESETS)}, "
                    "or pass a list of module-path suffixes such as ['to_q', 'to_v']"
                )
        elif not _strings(self.target_modules) or not self.target_modules:
            raise ValueError(
                "target_modules must be a preset name or a non-empty list of module-path suffixes, got "
                f"{self.target_modules!r}"
            )
        else:
            self.target_modules = list(self.target_modules)
        if not _strings(self.exclude_modules):
            raise ValueError(
                f"exclude_modules must be a list of module-path fragments such as ['mid_block'], got "
                f"{self.exclude_modules!r}"
            )
        self.exclude_modules = list(self.exclude_modules)
        if not isinstance(self.init_seed, numbers.Integral) or isinstance(self.init_seed, bool):
            raise ValueError(f"init_seed must be an integer, got {self.init_seed!r}")
        self.init_seed = int(self.init_seed)

    @property
    def target_suffixes(self) -> tuple[str, ...]:
        if isinstance(self.target_modules, str):
            return TARGET_PRESETS[self.target_modules]
        return tuple(self.target_modules)

    def is_target(self, path: str) -> bool:
        """Whether the module at dotted ``path`` is adapted under this config."""
        if any(matches_module_path(path, pattern) for pattern in self.exclude_modules):
            return False
        return any(path == suffix or path.endswith("." + suffix) for suffix in self.target_suffixes)

    # --- JSON ---------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["sides"] = list(self.sides)
        data["format_version"] = CONFIG_FORMAT_VERSION
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> EtherConfig:
        if not isinstance(data, dict):
            raise ValueError(f"an EtherConfig is a JSON object of its fields, got {data!r:.60}")
        data = dict(data)
        version = data.pop("format_version", None)
        if version != CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"EtherConfig format_version {version!r} is not supported (this library reads version "
                f"{CONFIG_FORMAT_VERSION}); upgrade ether-diffusion to read newer adapters"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"EtherConfig has unknown fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> EtherConfig:
        return cls.from_dict(json.loads(text))
