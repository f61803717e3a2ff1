"""The registry: model family × kind of training → configuration, model backend and task, declared once.

    family   dreambooth                                          control
    sd       DreamBoothConfig      StableDiffusionBackend        ControlConfig  StableDiffusionBackend
    sdxl     DreamBoothXLConfig    StableDiffusionXLBackend      -
    sd3      DreamBoothSD3Config   StableDiffusion3Backend       -
    flux     DreamBoothFluxConfig  FluxBackend                   -

The command line (``train``, ``train-control``), the training scripts, the studio (its jobs and estimate), the demos
and the benchmarks ask it; nothing else dispatches on a family or a kind. The family is read from the model once
(``families.model_family``: its ``model_index.json``) and handed to the backend::

    config = parse_args(TaskKind.DREAMBOOTH, argv)      # the flags of the model's family (SDXL adds its VAE flag)
    task = task_for(config)                             # the kind's task on the backend of the model's family
    result = train(config, callbacks)                   # Trainer(task_for(config), callbacks).train()

A new model family is one module (its backend and the flags it adds: ``training/sdxl.py``) registered in
``REGISTRY`` below, with its configuration class per kind; a new kind of training is a configuration and a task
(``control/train.py``) and its rows.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from .control.train import ControlConfig, ControlTask
from .families import FAMILIES, ModelFamily, UnsupportedModelError, model_family
from .training.config import ConfigError, RunConfig, TaskKind
from .training.dreambooth import DREAMBOOTH_FOREIGN_FLAGS, DreamBoothConfig, DreamBoothTask
from .training.flow import FLOW_FOREIGN_FLAGS
from .training.flux import FluxBackend, FluxOptions
from .training.sd import StableDiffusionBackend
from .training.sd3 import SD3Options, StableDiffusion3Backend
from .training.sdxl import SDXLOptions, StableDiffusionXLBackend
from .training.task import Task
from .training.trainer import Trainer, TrainResult

__all__ = [
    "REGISTRY",
    "DreamBoothFluxConfig",
    "DreamBoothSD3Config",
    "DreamBoothXLConfig",
    "Entry",
    "config_classes",
    "families_for",
    "parse_args",
    "resolve",
    "task_for",
    "train",
]


# --- the configurations of DreamBooth on the other families: DreamBooth's flags plus the family's -----------------
@dataclass(kw_only=True)
class DreamBoothXLConfig(SDXLOptions, DreamBoothConfig):
    task_name = "dreambooth-sdxl"
    description = "DreamBooth with ETHER on Stable Diffusion XL (flags of diffusers' train_dreambooth_lora_sdxl)"


@dataclass(kw_only=True)
class DreamBoothSD3Config(SD3Options, DreamBoothConfig):
    task_name = "dreambooth-sd3"
    description = "DreamBooth with ETHER on Stable Diffusion 3 (flags of diffusers' train_dreambooth_lora_sd3)"
    foreign_flags = {**DREAMBOOTH_FOREIGN_FLAGS, **FLOW_FOREIGN_FLAGS}


@dataclass(kw_only=True)
class DreamBoothFluxConfig(FluxOptions, DreamBoothConfig):
    task_name = "dreambooth-flux"
    description = "DreamBooth with ETHER on Flux (flags of diffusers' train_dreambooth_lora_flux)"
    foreign_flags = {**DREAMBOOTH_FOREIGN_FLAGS, **FLOW_FOREIGN_FLAGS}


@dataclass(frozen=True)
class Entry:
    """What trains one kind on one family."""

    config: type[RunConfig]
    backend: type[StableDiffusionBackend]
    task: type[Task]


REGISTRY: dict[tuple[str, TaskKind], Entry] = {
    ("sd", TaskKind.DREAMBOOTH): Entry(DreamBoothConfig, StableDiffusionBackend, DreamBoothTask),
    ("sdxl", TaskKind.DREAMBOOTH): Entry(DreamBoothXLConfig, StableDiffusionXLBackend, DreamBoothTask),
    ("sd3", TaskKind.DREAMBOOTH): Entry(DreamBoothSD3Config, StableDiffusion3Backend, DreamBoothTask),
    ("flux", TaskKind.DREAMBOOTH): Entry(DreamBoothFluxConfig, FluxBackend, DreamBoothTask),
    ("sd", TaskKind.CONTROL): Entry(ControlConfig, StableDiffusionBackend, ControlTask),
}


def families_for(kind: TaskKind) -> list[str]:
    """The families ``kind`` trains, in ``FAMILIES`` order."""
    return [name for name in FAMILIES if (name, kind) in REGISTRY]


def config_classes(kind: TaskKind) -> list[type[RunConfig]]:
    """The configuration classes of ``kind``, one per family."""
    return [REGISTRY[name, kind].config for name in families_for(kind)]


def resolve(kind: TaskKind, model: str | None, revision: str | None = None, model_config: str | None = None):
    """``(family, entry)`` of ``kind`` on ``model`` (a folder, hub id or single checkpoint file with its ``config``
    folder; ``None``: the shipped tiny model); ``UnsupportedModelError`` when the family is unknown or ``kind`` does
    not train it, naming what it does train."""
    family = model_family(model, revision, model_config)
    entry = REGISTRY.get((family.name, TaskKind(kind)))
    if entry is None:
        labels = " and ".join(FAMILIES[name].label for name in families_for(kind))
        raise UnsupportedModelError(
            f"'{model or 'the shipped tiny model'}' is a {family.label} model ({family.pipeline}); {kind} training "
            f"supports {labels} models"
        )
    return family, entry


def _not_for_this_model(flags: list[str], model: str | None, family: ModelFamily) -> str:
    return (
        f"{', '.join('--' + f for f in flags)} {'does' if len(flags) == 1 else 'do'} not apply to {family.label} "
        f"models, and '{model or 'the shipped tiny model'}' is one"
    )


def parse_args(kind: TaskKind, argv: list[str] | None = None, prog: str | None = None) -> RunConfig:
    """The flags of ``kind`` on the model ``--pretrained_model_name_or_path`` names (its family's configuration:
    ``DreamBoothXLConfig`` for an SDXL model), validated. A model of a family ``kind`` does not train, and flags of
    another family's configuration, are usage errors that say so."""
    kind = TaskKind(kind)
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--pretrained_model_name_or_path")
    probe.add_argument("--revision")
    probe.add_argument("--config", dest="model_config")
    known, _ = probe.parse_known_args(argv)
    model = known.pretrained_model_name_or_path
    base = REGISTRY["sd", kind].config
    try:
        family, entry = resolve(kind, model, known.revision, known.model_config)
    except UnsupportedModelError as err:
        base.build_parser(prog).error(str(err))
    others = {f.name for config in config_classes(kind) for f in dataclasses.fields(config)}
    foreign = others - {f.name for f in dataclasses.fields(entry.config)}
    given = sorted(flag for flag in foreign if any(a.split("=")[0] == f"--{flag}" for a in argv or []))
    if given:
        entry.config.build_parser(prog).error(_not_for_this_model(given, model, family))
    return entry.config.from_args(argv, prog)


def task_for(config: RunConfig, adapters=None) -> Task:
    """The task of ``config``'s kind on the backend of its model's family, with ETHER adapters (or ``adapters``: the
    benchmarks' PEFT peers). A configuration of another family of the same kind is carried over field by field (an
    SD one for an SDXL model gets the SDXL flags' defaults); one that sets flags the model's family does not have is
    a ``ConfigError``."""
    config.validate()
    model = config.pretrained_model_name_or_path
    family, entry = resolve(config.kind, model, config.revision, config.model_config)
    if type(config) is not entry.config and type(config) in config_classes(config.kind):
        names = {f.name for f in dataclasses.fields(entry.config)}
        extra = [f for f in dataclasses.fields(config) if f.name not in names]
        lost = [f.name for f in extra if getattr(config, f.name) != f.default]
        if lost:
            raise ConfigError(f"{_not_for_this_model(lost, model, family)}; use {entry.config.__name__}")
        # a flag left at its default takes the model family's default (--target_modules: the family's attention)
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                  if f.name in names and getattr(config, f.name) != f.default}  # fmt: skip
        config = entry.config(**fields).validate()
    return entry.task(config, entry.backend(config, family), adapters)


def train(config: RunConfig, callbacks=(), adapters=None) -> TrainResult:
    """Validate ``config`` and train it on the library's loop (``task_for``); returns what was trained and where."""
    return Trainer(task_for(config, adapters), callbacks).train()
