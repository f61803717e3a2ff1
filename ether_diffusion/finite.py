"""Finite weights only: the one check every writer of weights runs before it replaces a file.

A NaN or an infinity in a written file is lost work that looks like success: the file loads, and every image drawn
from it is black. It gets there in two ways, and the message tells them apart:

- the values themselves are not finite (a diverged training run, a strength that overflows the computation);
- they are finite as computed but not in the dtype the file holds: 1e5 is a float32 and an infinity in float16,
  whose largest value is 65504. ``dtype`` makes the check cast as the writer will, so this is caught before writing.

``check_finite(tensors, what, advice, dtype=None)`` raises ``NonFiniteError`` naming the first tensor that is not
finite, what it is, the dtype and its range; ``advice`` says what to do instead. Nothing is written then: writers
call it before they open their temporary file (``pipeline.fuse_ether`` calls it too, on the fused weights, and
restores them). torch only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .config import DTYPES

__all__ = ["DTYPE_NAMES", "NonFiniteError", "check_finite"]

#: how messages name a floating dtype: the names of ``--dtype`` (``config.DTYPES``), and fp64
DTYPE_NAMES = {**{dtype: name for name, dtype in DTYPES.items()}, torch.float64: "fp64"}


class NonFiniteError(ValueError):
    """Weights about to be written hold NaN or infinite values (as computed, or once cast); nothing was written."""


def _problem(value: torch.Tensor, written: torch.Tensor) -> str:
    """What is wrong with ``written`` (``value`` cast to the file's dtype), in words."""
    name = DTYPE_NAMES.get(written.dtype, str(written.dtype))
    count = f"of {written.numel():,} values"
    nan = int(torch.isnan(written).sum())
    if nan:
        return f"holds NaN ({nan:,} {count})"
    beyond = f"holds values beyond {name}'s range (max {torch.finfo(written.dtype).max:.5g}"
    largest = value.detach().abs().max().item()
    if largest != float("inf"):  # finite as computed: the cast overflows
        return f"{beyond}; largest magnitude {largest:.3g})"
    return f"{beyond}; {int(torch.isinf(written).sum()):,} {count} are infinite)"


def check_finite(
    tensors: Mapping[str, torch.Tensor],
    what: str,
    advice: str,
    dtype: torch.dtype | None = None,
    outcome: str = "nothing was written",
) -> None:
    """Raise ``NonFiniteError`` unless every floating tensor of ``tensors`` (``{name: tensor}``) is finite, after a
    cast to ``dtype`` when one is given (the dtype the writer will write). The message reads
    ``"{what} {name} holds values beyond fp16's range (max 65504; largest magnitude 1.2e+10): {outcome}; {advice}"``.
    """
    for name, value in tensors.items():
        if not value.is_floating_point():
            continue
        written = value if dtype is None or value.dtype == dtype else value.to(dtype)
        if not torch.isfinite(written).all():
            raise NonFiniteError(f"{what} {name} {_problem(value, written)}: {outcome}; {advice}")
