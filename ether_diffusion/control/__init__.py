"""Controllable synthesis: a condition encoder trained with ETHER adapters on a frozen Stable Diffusion."""

from .data import ControlDataError, ControlDataset, control_to_tensor, write_world_control_dataset
from .encoder import (
    ConditionEncoder,
    ConditionEncoderConfig,
    ConditionMismatchError,
    attach_condition_encoder,
    detach_condition_encoder,
    set_condition,
)
from .pipeline import (
    CONTROL_WEIGHT_NAME,
    EtherControlPipeline,
    load_control_weights,
    save_control_weights,
    unload_control_weights,
)

__all__ = [
    "CONTROL_WEIGHT_NAME",
    "ConditionEncoder",
    "ConditionEncoderConfig",
    "ConditionMismatchError",
    "ControlDataError",
    "ControlDataset",
    "EtherControlPipeline",
    "attach_condition_encoder",
    "control_to_tensor",
    "detach_condition_encoder",
    "load_control_weights",
    "save_control_weights",
    "set_condition",
    "unload_control_weights",
    "write_world_control_dataset",
]
