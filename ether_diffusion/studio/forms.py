"""What every training form of the studio asks for, and how it is checked before a job starts.

``FormSpec`` holds the settings the Train tab (``TrainSpec``, DreamBooth) and the Control tab (``ControlSpec``)
share; each form extends it with its own fields, defaults and checks:

    FormSpec     adapter_name, method, n_blocks, max_train_steps, learning_rate, seed,
    │            preview_every, preview_prompt, preview_images, preview_steps, guidance_scale
    ├─ TrainSpec    (jobs.py)    instance_prompt, subject | uploads, class_prompt, prior preservation, ...
    └─ ControlSpec  (control.py) source, data_dir | scenes, encoder_learning_rate, train_batch_size

``validated()`` returns a checked copy: the adapter name is safe (``check_name``), the method is the library's
name ("ETHER+" -> "ether_plus"), every whole-number field lies in its range (``WHOLE_NUMBERS``, one table per
form), every learning rate is above 0 and at most 1; a form's own ``validated`` adds its checks after these. A
refused value raises ``StudioError`` with a message for the page. The field names are those of a job's
``state.json`` and a preset's settings: renaming one makes old files unreadable.
"""

from __future__ import annotations

import copy
from dataclasses import KW_ONLY, dataclass
from typing import ClassVar

from ..config import METHOD_LABELS
from ..quantize import check_quantization
from ..training.config import ETHER_METHODS, TaskKind
from .workspace import StudioError, check_name

__all__ = ["COMMON_RANGES", "METHODS", "FormSpec", "check_whole_numbers", "short_rate"]

#: "ETHER+" (the form's label) or "ether_plus" (the library's name) -> "ether_plus"
METHODS = {**{label: method for method, label in METHOD_LABELS.items() if method in ETHER_METHODS},
           **{method: method for method in ETHER_METHODS}}  # fmt: skip

#: the ranges of the whole-number settings every training form has (each form adds its own)
COMMON_RANGES = dict(max_train_steps=(1, 100_000), n_blocks=(1, 64), preview_every=(1, 100_000), preview_images=(1, 8),
                     preview_steps=(1, 200))  # fmt: skip


def check_whole_numbers(spec, **ranges: tuple[int, int]) -> None:
    """Each named field of ``spec`` a whole number within its ``(low, high)``, made an int; StudioError if not."""
    for name, (low, high) in ranges.items():
        value = getattr(spec, name)
        if value is None or isinstance(value, bool) or int(value) != value or not low <= int(value) <= high:
            raise StudioError(f"{name.replace('_', ' ')} must be a whole number from {low} to {high}")
        setattr(spec, name, int(value))


def short_rate(rate: float) -> str:
    """6e-3 as "6e-3" (not "0.006" nor "6e-03"), as the page's labels write the paper's rates."""
    mantissa, exponent = f"{rate:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


@dataclass
class FormSpec:
    """The settings every training form shares. Only ``adapter_name`` may be given by position; the rest by name.
    ``max_train_steps`` and ``learning_rate`` have no default here: each form sets its own."""

    kind: ClassVar[TaskKind]  # the kind of training: a job's "kind" in its state.json, a preset's in its file
    #: whole-number fields of this form beyond COMMON_RANGES, with their (low, high)
    WHOLE_NUMBERS: ClassVar[dict[str, tuple[int, int]]] = {}
    #: learning-rate fields of this form, each with the paper's value the message cites
    LEARNING_RATES: ClassVar[dict[str, float]] = {}

    adapter_name: str
    _: KW_ONLY
    method: str = "ether_plus"
    n_blocks: int = 1
    base_quantization: str = "none"  # the frozen base model's Linear weights: none, int8, nf4 (quantize.py)
    max_train_steps: int
    learning_rate: float
    seed: int = 0
    preview_every: int = 100
    preview_prompt: str = ""  # empty: the form's own (the instance prompt, the held-out control's caption)
    preview_images: int = 2
    preview_steps: int = 25
    guidance_scale: float = 5.0

    @classmethod
    def ranges(cls) -> dict[str, tuple[int, int]]:
        """Every whole-number field of this form with its ``(low, high)``: what Start accepts, what the page's
        number boxes allow."""
        return {**COMMON_RANGES, **cls.WHOLE_NUMBERS}

    def validated(self):
        """A checked copy of the form (see the module's docstring); StudioError says what to fix."""
        spec = copy.deepcopy(self)
        spec.adapter_name = check_name(spec.adapter_name)
        if spec.method not in METHODS:
            raise StudioError(f"method {spec.method!r}: choose ETHER or ETHER+")
        spec.method = METHODS[spec.method]
        problem = check_quantization(spec.base_quantization)
        if problem:
            raise StudioError(problem.replace("--base_quantization", "base model weights"))
        check_whole_numbers(spec, **spec.ranges())
        for name, paper in spec.LEARNING_RATES.items():
            if not 0 < float(getattr(spec, name)) <= 1:
                words = name.replace("_", " ")
                raise StudioError(f"the {words} must be above 0 and at most 1 (the paper uses {short_rate(paper)})")
        return spec
