"""Timing on a shared machine: interleaved rounds, medians with their range, per-round ratios, peak memory.

Every benchmark here (``bench speed``, ``bench host``, ``bench cache-latents``) visits its variants in interleaved
rounds: every round runs every variant once, the order rotated by one each round, so that the machine's drift over
minutes falls on all of them alike. A time is the median over rounds with its range; a ratio is taken within each
round (variant / floor of the same round) and reported as the median and range of those per-round ratios.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["Meter", "interleaved", "machine_description", "no_host_sync", "spread", "timings"]


class Meter:
    def __init__(self, device: torch.device, clock: str = "wall"):
        self.device = device
        # "cpu" counts the process's CPU time: on a machine shared with other work, time spent waiting for a core
        # is not counted (use with --threads 1, where it equals the work done)
        self.clock = time.process_time if clock == "cpu" else time.perf_counter

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self) -> int:
        """Start a peak-memory window; returns the current footprint in bytes."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed blocks back, so RSS tracks live tensors
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
        return self._status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM")

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def seconds_per_call(self, fn, calls: int) -> float:
        self.sync()
        start = self.clock()
        for _ in range(calls):
            fn()
        self.sync()
        return (self.clock() - start) / calls


def interleaved(names: list[str], rounds: int, visit: Callable[[str], object]) -> dict[str, list]:
    """``visit(name)`` for every name once per round, the order rotated by one each round; results per name, in
    round order (so that index r of two names pairs results of the same round)."""
    results = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(visit(name))
    return results


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and quartiles of ``values`` (quartiles equal the median for fewer than two values)."""
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1 else ordered * 3
    return dict(median=statistics.median(ordered), min=ordered[0], max=ordered[-1], q1=q1, q3=q3)


def timings(times: list[float], floor: list[float]) -> dict:
    """A variant's per-round times, their spread, and the spread of its per-round ratios to the floor's."""
    return dict(times=times, time=spread(times), ratio=spread([t / f for t, f in zip(times, floor)]))


@contextlib.contextmanager
def no_host_sync(device: torch.device):
    """On CUDA every operation that makes the host wait for the device raises inside this block
    (``torch.cuda.set_sync_debug_mode("error")``); yields whether anything is checked (nothing on a CPU)."""
    if device.type != "cuda":
        yield False
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield True
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def machine_description(device) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
    return text
