"""What the benchmarks share: the methods they compare (small strategy objects in a dict), the grid and evaluation
options, and the defaults that depend on the model (the paper's protocol on a real model, the tiny world's on the
shipped one).

A benchmark configuration is its task's run configuration plus the grid: every training flag (``--resolution``,
``--mixed_precision``, ``--n_blocks``, ``--gradient_checkpointing``, ...) applies to every run, while the flags the
benchmark sets per run (data, prompts, method, learning rate, seed, output folder, resume) are not offered.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from ..models import default_model
from ..training.adapters import PeftPeer
from ..training.config import ConfigError, option

__all__ = [
    "CONTROL_METHODS",
    "DREAMBOOTH_METHODS",
    "BenchOptions",
    "Method",
    "hidden",
    "is_tiny_model",
    "shipped_model_named",
]


@dataclass(frozen=True)
class Method:
    """A row of the benchmark: what trains, labelled as in the tables, at the paper's learning rate."""

    name: str
    label: str
    learning_rate: float  # the paper's, for this task
    ether_method: str = "ether_plus"  # ETHER variant (ignored by peers and by the encoder alone)
    peer: str | None = None  # a PEFT peer trained on the same loop
    adapters: bool = True  # False: the control encoder alone

    def config_changes(self, learning_rate: float) -> dict:
        changes = dict(ether_method=self.ether_method, learning_rate=learning_rate)
        if not self.adapters:
            changes["no_adapters"] = True
        return changes

    def make_adapters(self, config) -> PeftPeer | None:
        """What a run of this method trains in place of ETHER (a PEFT peer, new for each use), or None: ETHER."""
        return PeftPeer(self.peer, config.adapter_name, config.seed) if self.peer else None


# Learning rates: the ETHER paper's (Bini et al. 2024) for each method and task.
DREAMBOOTH_METHODS = {
    m.name: m
    for m in (
        Method("ether", "ETHER", 6e-3, "ether"),
        Method("ether_plus", "ETHER+ (two-sided)", 6e-3, "ether_plus"),
        Method("lora", "LoRA r=4 (PEFT)", 6e-4, peer="lora"),
        Method("oft", "OFT (PEFT)", 6e-5, peer="oft"),
    )
}
CONTROL_METHODS = {
    m.name: m
    for m in (
        Method("encoder", "encoder only", 1e-4, adapters=False),
        Method("ether", "ETHER", 1e-3, "ether"),
        Method("ether_plus", "ETHER+ (two-sided)", 1e-3, "ether_plus"),
        Method("oft", "OFT (PEFT)", 1e-5, peer="oft"),
        Method("lora", "LoRA r=4 (PEFT)", 1e-4, peer="lora"),  # the paper gives none; LoRA's DreamBooth ratio
    )
}


def hidden(default=None):
    """A field the benchmark sets per run: no flag."""
    return option(default, cli=False, same_run=False)


def is_tiny_model(model: str | None) -> bool:
    """Whether ``model`` is the shipped tiny model (whose world the offline defaults are for)."""
    if model is None:
        return True
    try:
        return Path(model).resolve() == Path(default_model()).resolve()
    except OSError:
        return False


SHIPPED_MODEL = "the shipped tiny model"


def shipped_model_named(identity: dict) -> dict:
    """The shipped model by name, not by its path in this checkout (another checkout resumes the same folder)."""
    if is_tiny_model(identity.get("pretrained_model_name_or_path")):
        identity["pretrained_model_name_or_path"] = SHIPPED_MODEL
    return identity


@dataclass(kw_only=True)
class BenchOptions:
    """The grid and the evaluation, shared by every benchmark (mixed into its task's run configuration)."""

    methods: list[str] | None = option(None, "methods to compare (default: all)", same_run=False)
    seeds: list[int] | None = option(None, "training seeds (default: 0)", same_run=False)
    lr_scales: list[float] | None = option(None, "multiples of each method's paper learning rate (default: 1)",
                                           same_run=False)  # fmt: skip
    method_learning_rates: list[str] | None = option(
        None, "replace a method's paper learning rate, e.g. lora=1e-4 (the ×1 of --lr_scales)"
    )
    images_per_prompt: int | None = option(None, "images sampled per prompt (paper: 4)", minimum=1)
    eval_seed: int = option(1000, "image k of every prompt is drawn from seed eval_seed + k", minimum=0)
    inference_steps: int | None = option(None, "sampling steps of evaluation and class images", minimum=1)
    guidance_scale: float | None = option(None, "classifier-free guidance of evaluation and class images",
                                          minimum=0.0)  # fmt: skip
    scheduler: str | None = option(
        None, "sampler of evaluation (and class) images; model: the model's own", choices=("ddim", "dpm", "model")
    )
    sample_batch: int = option(8, "images per sampling call (evaluation and class images)", minimum=1, same_run=False)
    quick: bool = option(False, "a smoke test: 2 steps, 2 prompts, 2 images each, 2 sampling steps", same_run=False)
    report_only: bool = option(False, "train nothing: write the table from the runs already finished",
                               same_run=False)  # fmt: skip

    # --- resolved ---------------------------------------------------------------------------------------------
    def check_grid(self, registry: dict[str, Method]) -> None:
        """Fill the grid's defaults and check it against the task's methods; ``ConfigError`` on bad values."""
        self.methods = list(self.methods or registry)
        unknown = [m for m in self.methods if m not in registry]
        if unknown:
            raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(registry)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError("--methods names a method twice")
        self.seeds = list(self.seeds if self.seeds is not None else [0])
        if not self.seeds or any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds must be distinct whole numbers ≥ 0, not {self.seeds}")
        self.lr_scales = list(self.lr_scales if self.lr_scales is not None else [1.0])
        if not self.lr_scales or any(not math.isfinite(s) or s <= 0 for s in self.lr_scales):
            raise ConfigError(f"--lr_scales must be positive finite numbers, not {self.lr_scales}")
        self.learning_rates(registry)

    def one_run(self, config_class, registry: dict[str, Method], method: str, scale: float, seed: int, run_dir: Path,
                **changes):  # fmt: skip
        """The run configuration of one run: every flag of ``config_class`` as given to the benchmark, plus what the
        benchmark sets per run (method, learning rate, seed, output folder; no validation; ``changes``)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(config_class)}
        rate = self.learning_rates(registry)[method] * scale
        fields.update(
            seed=seed,
            output_dir=str(run_dir / "train"),
            resume_from_checkpoint=None,  # the run sets "latest" when it has a checkpoint
            checkpoints_total_limit=1,
            validation_prompt=None,
            validation_steps=None,
            validation_epochs=None,
            no_final_reload=True,
            **changes,
            **registry[method].config_changes(rate),
        )
        return config_class(**fields)

    def learning_rates(self, registry: dict[str, Method]) -> dict[str, float]:
        """The ×1 learning rate of each method: the paper's, or ``--method_learning_rates``."""
        rates = {name: method.learning_rate for name, method in registry.items()}
        for item in self.method_learning_rates or []:
            name, sep, value = item.partition("=")
            try:
                rate = float(value)
            except ValueError:
                rate = float("nan")
            if not sep or name not in registry or not math.isfinite(rate) or rate <= 0:
                raise ConfigError(
                    f"--method_learning_rates: '{item}' is not method=rate with a method of {', '.join(registry)} "
                    "and a positive rate (e.g. lora=1e-4)"
                )
            rates[name] = rate
        return rates

    def grid(self) -> list[tuple[str, float, int]]:
        """Every (method, lr scale, seed) to run, in table order."""
        return [(m, s, seed) for m in self.methods for s in self.lr_scales for seed in self.seeds]

    @staticmethod
    def run_name(method: str, scale: float, seed: int) -> str:
        return f"{method}-x{scale:g}-seed{seed}"
