"""Progress that suits where it goes: a tqdm bar on a terminal; in a log file or a pipe, one plain line every N
steps (flushed, no carriage returns), so a log of a 2000-step run holds a few dozen readable lines instead of
thousands of bar redraws.

    progress = Progress(total=400, desc="steps", every=20)      # every=None: about 50 lines a run
    progress.update(step, loss="0.1234")                        # absolute count
    progress.close()
"""

from __future__ import annotations

import contextlib
import math
import sys
import time

from tqdm.auto import tqdm

__all__ = ["Progress", "is_terminal"]

#: lines per run when --progress_steps is not given
DEFAULT_LINES = 50


def is_terminal() -> bool:
    """Whether progress goes to a person: standard output and standard error are both terminals."""
    return all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts ``done`` out of ``total``; ``disable`` shows nothing, ``interactive`` (default: ``is_terminal()``)
    picks the bar over lines, ``stream`` is where lines go (default: standard output)."""

    def __init__(self, total: int, desc: str, initial: int = 0, every: int | None = None, disable: bool = False,
                 interactive: bool | None = None, stream=None):  # fmt: skip
        self.total, self.desc, self.done = total, desc, initial
        self.every = every or max(1, math.ceil(total / DEFAULT_LINES))
        self.stream = stream
        self.start, self.start_done = time.time(), initial
        self.bar = None
        self.lines = not disable and not (is_terminal() if interactive is None else interactive)
        if not disable and not self.lines:
            self.bar = tqdm(total=total, initial=initial, desc=desc)

    def update(self, done: int, **fields) -> None:
        """``done`` items are finished; ``fields`` (loss, lr, ...) are shown beside the count."""
        self.done = done
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if fields:
                self.bar.set_postfix(fields)
        elif self.lines and (done % self.every == 0 or done == self.total):
            print(self.line(fields), file=self.stream or sys.stdout, flush=True)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (validation samples, checkpoints) is left out of the rate and of the time left."""
        started = time.time()
        try:
            yield
        finally:
            self.start += time.time() - started
            if self.bar is not None:
                self.bar.start_t += time.time() - started

    def line(self, fields: dict) -> str:
        elapsed, counted = time.time() - self.start, self.done - self.start_done
        parts = [f"{self.desc} {self.done}/{self.total} ({100 * self.done // max(self.total, 1)}%)"]
        parts += [f"{name} {value}" for name, value in fields.items()]
        if counted > 0:
            per_item = elapsed / counted
            parts.append(f"{per_item:.2f} s/it" if per_item >= 1 else f"{1 / per_item:.2f} it/s")
            parts.append(f"elapsed {_duration(elapsed)}, left {_duration(per_item * (self.total - self.done))}")
        return "  ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
