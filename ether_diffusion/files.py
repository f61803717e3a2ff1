"""Writing files so that a good file is never lost: the temporary-file-and-rename pattern, for one file
(``atomic_write``, ``write_json``) or a whole folder (``atomic_folder``).

Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

__all__ = ["atomic_folder", "atomic_write", "read_json", "write_json"]


def _create_beside(path: Path) -> Path:
    """A new empty file next to ``path``, created as ``open()`` creates files: mode 0o666 less the umask.

    (``tempfile.mkstemp`` would create it 0o600, so every saved file would be unreadable to other users.)
    """
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary file beside '{path}'")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    If writing fails (full disk, a killed process, an exception), the temporary file is removed and whatever was
    at ``path`` before is untouched. A new file gets the mode ``open()`` would give it (0o666 less the umask); a
    replaced file keeps its mode.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write '{path}': the folder '{path.parent}' does not exist")
    tmp = _create_beside(path)
    try:
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = True):
    """Yield a new empty folder beside ``path`` to fill; on success it takes ``path``'s place in one rename.

    If filling it fails (full disk, a killed process, an exception), it is removed and whatever was at ``path`` is
    untouched. A folder already at ``path`` is replaced (moved aside first, removed once the new one is in place);
    with ``replace=False`` one that is there when the new one is complete is kept and the new one discarded (another
    process made the same folder meanwhile). The folder gets the mode ``mkdir`` would give it (0o777 less the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())
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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
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
