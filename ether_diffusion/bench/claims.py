"""Which process runs a run: a claim file in the run's folder, so that benchmark processes sharing an output folder
(one per GPU, each on its own ``--subjects``, or two started on the same grid by mistake) never train one run twice.

    runs/<subject>/<run>/claim.json     {"pid", "host", "token", "since"}: created with O_EXCL (one process wins),
                                        touched every HEARTBEAT seconds while held, removed when the run ends

A claim is held while its owner is alive. A process that finds a claim

- of a live process (the same host and its pid alive, or another host and touched within STALE seconds) leaves
  the run alone and says who holds it;
- of a dead process (the same host, its pid gone: killed, crashed, the machine restarted) or a stale one (not
  touched for STALE seconds: its owner stopped beating, wherever it ran) takes it over.

Taking over moves the old file aside in one rename and checks it is the claim that was judged dead; one that is not
(another process took the run over meanwhile) is put back. Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

__all__ = ["CLAIM", "HEARTBEAT", "STALE", "RunClaim"]

CLAIM = "claim.json"
HEARTBEAT = 60.0  # seconds between touches of a held claim
STALE = 600.0  # a claim not touched for this long is abandoned, whichever host made it
UNWRITTEN = 10.0  # an empty or unreadable claim this old is a process that died between creating and writing it


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one of another user counts: it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


class RunClaim:
    """This process's claim of one run folder. ``acquire()`` returns whether it holds it; ``holder`` then says who
    does when it does not. As a context manager it acquires on entry and releases on exit (also on Ctrl-C)."""

    def __init__(self, run_dir: str | os.PathLike, heartbeat: float = HEARTBEAT, stale: float = STALE):
        self.path = Path(run_dir) / CLAIM
        self.heartbeat, self.stale = heartbeat, stale
        self.held = False
        self.holder: dict | None = None  # the other owner's claim, when acquire() found one alive
        self._token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # --- reading a claim -------------------------------------------------------------------------------------------
    def _read(self) -> tuple[str, dict | None, float] | None:
        """``(text, claim or None if unreadable, seconds since last touched)``, or None if there is no claim."""
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            claim = json.loads(text)
        except ValueError:
            claim = None
        if not (isinstance(claim, dict) and isinstance(claim.get("pid"), int) and isinstance(claim.get("host"), str)):
            claim = None
        return text, claim, age

    def _abandoned(self, claim: dict | None, age: float) -> bool:
        if claim is None:
            return age > UNWRITTEN
        if age > self.stale:
            return True
        return claim["host"] == socket.gethostname() and not _alive(claim["pid"])

    @staticmethod
    def describe(claim: dict) -> str:
        """Who holds ``claim``, for the log."""
        since = claim.get("since")
        if not isinstance(since, int | float) or isinstance(since, bool):
            return f"process {claim['pid']} on {claim['host']}"
        return f"process {claim['pid']} on {claim['host']} since {time.strftime('%H:%M %d %b', time.localtime(since))}"

    # --- taking it -------------------------------------------------------------------------------------------------
    def _create(self) -> bool:
        claim = {"pid": os.getpid(), "host": socket.gethostname(), "token": self._token, "since": time.time()}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(claim) + "\n")
        return True

    def _take_over(self, seen: str) -> None:
        """Move the abandoned claim (whose text was ``seen``) aside, unless another process replaced it meanwhile."""
        aside = self.path.with_name(f".{CLAIM}.{self._token}.old")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another process took it over first
        try:
            if aside.read_text() != seen:  # a fresh claim made after the one judged dead: give it back
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        finally:
            aside.unlink(missing_ok=True)

    def acquire(self) -> bool:
        """Claim the run: True if this process holds it now; False if a live process does (``holder``)."""
        if self.held:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a claim may vanish or change between reading it and acting on it: look again
            if self._create():
                self.held, self.holder = True, None
                self._beat = threading.Thread(target=self._beating, name=f"claim {self.path}", daemon=True)
                self._beat.start()
                return True
            found = self._read()
            if found is None:
                continue
            text, claim, age = found
            if not self._abandoned(claim, age):
                self.holder = claim or {"pid": "?", "host": "?"}
                return False
            self._take_over(text)
        found = self._read()
        self.holder = (found[1] if found else None) or {"pid": "?", "host": "?"}
        return False

    def _mine(self) -> bool:
        found = self._read()
        return found is not None and found[1] is not None and found[1].get("token") == self._token

    def _beating(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if self._mine():
                with contextlib.suppress(OSError):
                    os.utime(self.path)

    def release(self) -> None:
        """Give the run up: stop touching the claim and remove it (only if it is still this process's)."""
        if not self.held:
            return
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._mine():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> RunClaim:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
