"""Measuring what generated images of the tiny world show: a trained evaluator and the metrics built on it."""

from .metrics import (
    ImageReading,
    SlotReading,
    diversity,
    embed,
    instance_self_similarity,
    miou,
    prompt_fidelity,
    read_images,
    segment,
    subject_fidelity,
)
from .model import EvaluatorConfig, WorldEvaluator, load_evaluator, save_evaluator

__all__ = [
    "EvaluatorConfig",
    "ImageReading",
    "SlotReading",
    "WorldEvaluator",
    "diversity",
    "embed",
    "instance_self_similarity",
    "load_evaluator",
    "miou",
    "prompt_fidelity",
    "read_images",
    "save_evaluator",
    "segment",
    "subject_fidelity",
]
