"""Text users give us (captions, prompts, prompt templates, ``metadata.jsonl`` lines): one size limit, read with a
bound, UTF-8, and every error naming the file, line or flag it came from.

Nothing here reads more than its limit allows: a caption file's size is known from ``fstat`` before a byte is read
(and no more than the limit plus one byte is read even from a file that grows, or from ``/proc``), a metadata line
is read up to its limit and refused when longer, and files that are not regular files (FIFOs, devices such as
``/dev/zero``, folders) are refused without reading them.

    caption = read_text_file(path, MAX_CAPTION_BYTES, "caption file")      # ValueError naming the file
    check_prompt(caption, f"the caption file '{path}'")                     # ValueError: too long, NUL
    for number, line in text_lines(path, MAX_METADATA_LINE_BYTES): ...    # ValueError naming file and line
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "MAX_CAPTION_BYTES",
    "MAX_METADATA_LINE_BYTES",
    "MAX_PROMPT_CHARS",
    "check_prompt",
    "read_text_file",
    "text_lines",
]

#: the most characters a caption, prompt or prompt template may have. The text encoders read at most 77 tokens
#: (CLIP) or 512 (T5: SD3, Flux) and drop the rest; a token is about 4 characters of English and seldom more than 8,
#: so 4,096 characters hold more than any encoder here reads, while a runaway file cannot fill the memory
MAX_PROMPT_CHARS = 4096
#: a caption file's size limit: UTF-8 spends at most 4 bytes on a character
MAX_CAPTION_BYTES = 4 * MAX_PROMPT_CHARS
#: the longest ``metadata.jsonl`` line read: a row's file names, its caption (at most ``MAX_PROMPT_CHARS``
#: characters, up to 6 bytes each as a JSON escape) and room for other columns
MAX_METADATA_LINE_BYTES = 1 << 20


def check_prompt(text: str, where: str) -> str:
    """``text`` if it is usable as a prompt, else ``ValueError`` naming ``where`` (a flag, a file and line)."""
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(
            f"{where} is {len(text):,} characters long, over the limit of {MAX_PROMPT_CHARS:,} (the text encoders "
            "read at most 77 tokens, or 512 for T5); shorten it"
        )
    if "\0" in text:
        raise ValueError(f"{where} holds a NUL character: a prompt is plain text; remove it")
    return text


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _open(path: Path, what: str):
    """``path`` opened for binary reading if it is a regular file, else ``ValueError``. ``O_NONBLOCK`` keeps the
    open of a FIFO from waiting for a writer; the type is then read from the open file, so what is checked is what
    is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise ValueError(f"the {what} '{path}' cannot be opened ({err.strerror or err})") from err
    kind = _not_regular(os.fstat(fd).st_mode)
    if kind:
        os.close(fd)
        raise ValueError(f"the {what} '{path}' is {kind}, not a text file; replace it with a UTF-8 text file")
    return os.fdopen(fd, "rb")


def _decode(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{where} is not UTF-8 text (byte 0x{data[err.start]:02x} at position {err.start}); it must be UTF-8 "
            "text: save it with that encoding"
        ) from None
    if "\0" in text:
        raise ValueError(f"{where} holds NUL bytes: it must be UTF-8 text, not binary data")
    return text


def read_text_file(path: str | Path, max_bytes: int, what: str = "text file", limit: str = "") -> str:
    """The UTF-8 text of the regular file ``path``, at most ``max_bytes`` long; ``ValueError`` naming it otherwise
    (too large, not UTF-8, NUL bytes, a folder, FIFO or device). The size is checked before anything is read.
    ``limit`` says in the message why the limit is what it is."""
    path = Path(path)
    with _open(path, what) as handle:
        size = os.fstat(handle.fileno()).st_size
        data = b"" if size > max_bytes else handle.read(max_bytes + 1)  # +1: a file that grew since is caught
    if max(size, len(data)) > max_bytes:
        why = f" ({limit})" if limit else ""
        raise ValueError(
            f"the {what} '{path}' is {max(size, len(data)):,} bytes, over the limit of {max_bytes:,}{why}; shorten it"
        )
    return _decode(data, f"the {what} '{path}'")


def text_lines(path: str | Path, max_line_bytes: int = MAX_METADATA_LINE_BYTES, what: str = "file"):
    """``(line number, text)`` of every line of the regular file ``path`` (line ends removed), each line read up to
    ``max_line_bytes`` and refused when longer, so one huge line is never held whole. ``ValueError`` names the file
    and line (too long, not UTF-8, NUL bytes) or the file (a folder, FIFO or device)."""
    path = Path(path)
    handle = _open(path, what)
    return _lines(handle, path, max_line_bytes)


def _lines(handle, path: Path, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    with handle:
        number = 0
        while True:
            raw = handle.readline(max_line_bytes + 2)  # the line and its \r\n: no more
            if not raw:
                return
            number += 1
            body = raw.rstrip(b"\r\n")
            if len(body) > max_line_bytes:
                raise ValueError(
                    f"'{path}', line {number}: longer than {max_line_bytes:,} bytes; a line holds one row (captions "
                    f"at most {MAX_PROMPT_CHARS:,} characters): split or shorten it"
                )
            yield number, _decode(body, f"'{path}', line {number}")
