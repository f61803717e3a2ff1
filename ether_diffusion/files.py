"""Writing files so that a good file is never lost: the temporary-and-rename pattern, for one file
(``atomic_write``, ``write_json``) or a whole folder (``atomic_folder``).

Every write happens in a private staging folder beside the target, ``.<name>.<12 hex digits>.tmp``: the file
(``atomic_write``) or the folder's content (``atomic_folder``), and whatever the writer itself creates there
(safetensors writes to a ``.tmpXXXXXX`` of its own and renames it). One rename puts the result in place; on any
failure the staging folder is removed and the target is as it was.

What a failure leaves:

- a write that fails (a full disk, no permission) raises ``WriteError``, one line naming what was written, the
  target, its folder and the cause, and saying that the file or folder already there is unchanged;
- a process killed while writing leaves its staging folder. The next write of the same target removes the staging
  folders of that target that are older than the running process and locked by no one: a writer holds an ``flock``
  on its staging folder until it is done, and the kernel drops the lock when a process dies, so a folder in use by
  another process is never taken. Nothing else is touched: only names of this writer's pattern for that target.

Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock, so staging folders left by killed writers are kept (never one in use)
    fcntl = None

__all__ = ["WriteError", "atomic_folder", "atomic_write", "read_json", "write_json"]

#: When this process started, near enough: staging folders of a target older than this (and unlocked) are stale.
_STARTED = time.time()

# ``.<name>.<12 hex>.tmp``; earlier versions named folder staging ``.<name>.<8 of [a-z0-9_]>.tmp`` (tempfile.mkdtemp)
_STAGING = r"\.{name}\.(?:[0-9a-f]{{12}}|[a-z0-9_]{{8}})\.tmp"

#: errors of writing that mean the disk (or the user's quota) is full
_FULL = (errno.ENOSPC, errno.EDQUOT)


class WriteError(OSError):
    """A file or folder could not be written (a full disk, no permission); whatever was at the target is
    unchanged. ``errno`` is the system's; the message is one line that names the target and says what to do."""

    def __str__(self) -> str:
        return self.strerror


def _os_error_number(err: BaseException) -> int | None:
    """The system error number behind a failed write: an OSError's own, or the ``(os error N)`` of a Rust io::Error
    that a library relays in its own exception (safetensors: ``SafetensorError('… No space left on device (os error
    28)')``)."""
    if isinstance(err, OSError):
        return err.errno
    found = re.search(r"\(os error (\d+)\)", str(err))
    return int(found.group(1)) if found else None


def _write_error(path: Path, err: BaseException, kind: str, existed: bool, what: str | None) -> WriteError | None:
    """``err`` as the one-line ``WriteError`` of writing ``path`` (a ``kind``: "file", "folder"; ``what`` it holds,
    for the message), or None when it is no system error (the writer's own exception, raised as it is)."""
    number = _os_error_number(err)
    if not number:
        return None
    target = f"{what} to '{path}'" if what else f"'{path}'"
    kept = f"the {kind} that was there is unchanged" if existed else "nothing was written"
    if number in _FULL:
        return WriteError(
            number,
            f"could not write {target}: the disk is full ({os.strerror(number)} in '{path.parent}'); {kept}. Free "
            "some space or write elsewhere, then run again",
        )
    return WriteError(number, f"could not write {target} ({os.strerror(number)} in '{path.parent}'); {kept}")


def _lock(folder: str | Path) -> tuple[int | None, bool]:
    """Open ``folder`` and try an exclusive ``flock`` on it: (descriptor or None, whether the lock was taken)."""
    if fcntl is None:
        return None, False
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None, False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return fd, False
    return fd, True


def _locked(folder: Path) -> int | None:
    """A descriptor of ``folder`` holding an exclusive ``flock`` on it (None where locks are not available). On a file
    system without flock the descriptor holds nothing and the folder counts as in use for everyone (never removed)."""
    return _lock(folder)[0]


def _in_use(folder: str) -> bool:
    """True unless ``folder`` can be locked now, i.e. unless no living process holds it (and locks work here)."""
    fd, taken = _lock(folder)
    if fd is not None:
        os.close(fd)  # releases the lock just taken
    return not taken


def _remove_stale(path: Path) -> None:
    """Remove the staging folders (and the temporary files of earlier versions) that killed writers of ``path`` left
    beside it: names of this writer's pattern for ``path`` only, older than this process and locked by no one."""
    pattern = re.compile(_STAGING.format(name=re.escape(path.name)))
    try:
        entries = [e for e in os.scandir(path.parent) if pattern.fullmatch(e.name)]
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_symlink() or entry.stat(follow_symlinks=False).st_mtime >= _STARTED:
                continue  # younger than this process: maybe a writer that has not locked its folder yet
            if entry.is_dir(follow_symlinks=False):
                if not _in_use(entry.path):
                    shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)  # a temporary file of an earlier version (this one writes none), left by a kill
        except OSError:
            continue


@contextlib.contextmanager
def _staging(path: Path, kind: str, existed: bool, what: str | None):
    """A new locked staging folder beside ``path`` (mode as ``mkdir`` gives: 0o777 less the umask), after removing
    stale ones; unlocked when the block ends. The caller removes or renames it."""
    _remove_stale(path)
    for _ in range(100):
        folder = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.mkdir(folder, 0o777)
        except FileExistsError:
            continue
        except OSError as err:  # no permission, a read-only or full file system
            raise (_write_error(path, err, kind, existed, what) or err) from err
        break
    else:
        raise FileExistsError(f"could not create a staging folder beside '{path}'")
    fd = _locked(folder)
    try:
        yield folder
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, what: str | None = None):
    """Yield a temporary path (in a staging folder beside ``path``); on success it replaces ``path`` in one rename.

    If writing fails (full disk, a killed process, an exception), the temporary file is removed and whatever was
    at ``path`` before is untouched; an error of the system (``OSError``, or a library's error around one) becomes a
    one-line ``WriteError`` ("could not write {what} to '{path}': the disk is full …"). A new file gets the mode
    ``open()`` would give it (0o666 less the umask); a replaced file keeps its mode.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write '{path}': the folder '{path.parent}' does not exist")
    existed = path.exists()
    with _staging(path, "file", existed, what) as staging:
        tmp = staging / path.name
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)  # a replaced file keeps its mode
            except FileNotFoundError:
                mode = stat.S_IMODE(os.stat(tmp).st_mode)  # what open() gives a new file here
            yield tmp
            # Set after writing: a writer may itself replace the file (safetensors' save_file does, with mode 0o600).
            os.chmod(tmp, mode)
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException as err:
            failed = _write_error(path, err, "file", existed, what) if isinstance(err, Exception) else None
            if failed is not None:
                raise failed from err
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = True, what: str | None = None):
    """Yield a new empty folder beside ``path`` to fill; on success it takes ``path``'s place in one rename.

    If filling it fails (full disk, a killed process, an exception), it is removed and whatever was at ``path`` is
    untouched; an error of the system becomes a one-line ``WriteError``. A folder already at ``path`` is replaced
    (moved aside first, removed once the new one is in place); with ``replace=False`` one that is there when the new
    one is complete is kept and the new one discarded (another process made the same folder meanwhile). The folder
    gets the mode ``mkdir`` would give it (0o777 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    with _staging(path, "folder", existed, what) as staging:
        try:
            yield staging
            if path.exists() and not replace:
                shutil.rmtree(staging)
                return
            aside = None
            if path.exists():
                aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, aside / path.name)
            try:
                os.replace(staging, path)
            except BaseException:
                if aside is not None:
                    os.replace(aside / path.name, path)
                raise
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)
            failed = _write_error(path, err, "folder", existed, what) if isinstance(err, Exception) else None
            if failed is not None:
                raise failed from err
            raise


def write_json(path: str | os.PathLike, data) -> Path:
    """``data`` as indented JSON, written atomically (a reader never sees half a file)."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def read_json(path: str | os.PathLike):
    """The JSON at ``path``, or None if it is absent or damaged."""
    path = Path(path)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None
