"""Sampling with and without adapters from the same seeds: one function for the CLI, the demos, the studio, the
training previews and the benchmarks.

    samples = sample_images(pipe, ["a sks star"], seeds=[0, 1], variants=("adapted", "base"))
    [(s.prompt, s.seed, s.variant) for s in samples]
    # [("a sks star", 0, "adapted"), ("a sks star", 0, "base"), ("a sks star", 1, "adapted"), ...]

Image ``k`` of a prompt is always drawn from ``torch.Generator().manual_seed(seeds[k])``, so the adapted and base
images of one seed differ only by the adapter. With ``batch_size=1`` (the default) an image is bit-for-bit the same
whatever else is asked for in the same call; larger batches are faster and equal up to float rounding.

Sampling can be stopped between denoising steps: inside ``with interruptible(should_stop):`` every call checks
``should_stop()`` after each step (diffusers' ``callback_on_step_end``) and raises ``SamplingInterrupted`` when it
says so. The training loop wraps its validation and preparation this way, so a stop never waits for a preview.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from .pipeline import disable_ether, enable_ether

__all__ = ["Sample", "SamplingInterrupted", "ether_switch", "interruptible", "sample_images"]

VARIANTS = ("adapted", "base")
_should_stop: ContextVar[Callable[[], bool] | None] = ContextVar("ether_should_stop_sampling", default=None)


class SamplingInterrupted(Exception):
    """Sampling stopped between two denoising steps because the ``interruptible`` check asked it to."""


@contextmanager
def interruptible(should_stop: Callable[[], bool]):
    """Within this block (this thread), ``sample_images`` stops after the current denoising step once
    ``should_stop()`` is true, raising ``SamplingInterrupted``."""
    token = _should_stop.set(should_stop)
    try:
        yield
    finally:
        _should_stop.reset(token)


def _stop_if_asked() -> None:
    check = _should_stop.get()
    if check is not None and check():
        raise SamplingInterrupted("sampling was stopped")


def _with_stop_check(pipe_kwargs: dict) -> dict:
    """``pipe_kwargs`` with a step-end callback that checks for a stop (after the caller's own, if any)."""
    if _should_stop.get() is None:
        return pipe_kwargs
    theirs = pipe_kwargs.get("callback_on_step_end")

    def on_step_end(pipe, step, timestep, tensors):
        if theirs is not None:
            tensors = theirs(pipe, step, timestep, tensors)
        _stop_if_asked()
        return tensors

    return {**pipe_kwargs, "callback_on_step_end": on_step_end}


def _with_step_count(pipe_kwargs: dict, on_step: Callable[[int, int], None], total: int) -> dict:
    """``pipe_kwargs`` with a step-end callback that counts denoising steps over every pipeline call."""
    theirs, done = pipe_kwargs.get("callback_on_step_end"), [0]

    def on_step_end(pipe, step, timestep, tensors):
        if theirs is not None:
            tensors = theirs(pipe, step, timestep, tensors)
        done[0] += 1
        on_step(min(done[0], total), total)
        return tensors

    return {**pipe_kwargs, "callback_on_step_end": on_step_end}


@dataclass(frozen=True)
class Sample:
    prompt: str
    seed: int
    variant: str  # "adapted" or "base"
    image: object  # PIL.Image


def ether_switch(pipe, enabled: bool) -> None:
    """Turn a pipeline's ETHER adapters on or off (what ``variants`` toggles by default)."""
    (enable_ether if enabled else disable_ether)(pipe)


@torch.no_grad()
def sample_images(
    pipe,
    prompts: list[str],
    seeds: list[int],
    *,
    variants: tuple[str, ...] = ("adapted",),
    switch=ether_switch,
    num_inference_steps: int = 25,
    guidance_scale: float = 5.0,
    negative_prompt: str | None = None,
    batch_size: int = 1,
    on_step: Callable[[int, int], None] | None = None,
    **pipe_kwargs,
) -> list[Sample]:
    """One image per (prompt, seed, variant), ordered by prompt, then seed, then variant.

    ``variants``: ``"adapted"`` samples with the pipeline's adapters as they are set, ``"base"`` with them switched
    off by ``switch(pipe, False)`` (and back on afterwards). Extra keyword arguments go to every pipeline call
    (``image=`` for a control pipeline, ``height``/``width``). Inside ``interruptible(...)`` it may raise
    ``SamplingInterrupted`` between denoising steps. ``on_step(done, total)`` hears of every denoising step done, of
    all the calls together (a progress bar's numbers).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {VARIANTS}")
    rows = [(p, s) for p in prompts for s in seeds]
    if on_step is not None:
        pipe_kwargs = _with_step_count(pipe_kwargs, on_step, num_inference_steps * len(variants) * math.ceil(
            len(rows) / batch_size))  # fmt: skip
    pipe_kwargs = _with_stop_check(pipe_kwargs)
    drawn: dict[str, list] = {}
    for variant in variants:
        if variant == "base":
            switch(pipe, False)
        try:
            images = []
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                _stop_if_asked()
                images += pipe(
                    [p for p, _ in chunk],
                    negative_prompt=None if negative_prompt is None else [negative_prompt] * len(chunk),
                    generator=[torch.Generator().manual_seed(int(s)) for _, s in chunk],
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    **pipe_kwargs,
                ).images
        finally:
            if variant == "base":
                switch(pipe, True)
        drawn[variant] = images
    return [
        Sample(prompt, seed, variant, drawn[variant][i])
        for i, (prompt, seed) in enumerate(rows)
        for variant in variants
    ]
