"""Who may use the studio: the login it asks for, and where it refuses to listen without one.

The studio's page can upload files, train, delete and export adapters: whoever reaches its port can do all of it.
It listens on the loopback (``--host 127.0.0.1``, only this machine) unless told otherwise, and asks for a login when
given accounts, the way the field does it (A1111's ``--gradio-auth user:pass``, kohya_ss's ``--username`` and
``--password``, Gradio's ``launch(auth=...)``, which the page uses):

    --auth USER:PASSWORD        an account (repeat for several); the password may hold ':', the user name not
    --auth_file FILE            one USER:PASSWORD a line; blank lines and lines starting with '#' are skipped
    --insecure_no_auth          listen beyond the loopback without a login, knowingly

Listening beyond the loopback (``0.0.0.0``, a LAN address, a host name that is not only this machine) without an
account is refused, with the risk spelled out, unless ``--insecure_no_auth`` says it is meant. Passwords are never
repeated: not in messages (a bad line is named by its file and number), not in logs, not on the page. Standard
library only.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from .workspace import StudioError

__all__ = ["MAX_AUTH_FILE_BYTES", "accounts", "check_exposure", "is_loopback"]

MAX_AUTH_FILE_BYTES = 1 << 20  # a file of accounts is a few lines; a larger one is a wrong path
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is only this machine: every address it resolves to is a loopback."""
    host = host.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = {info[4][0].split("%")[0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False  # unknown: assume the network
    return bool(found) and all(ipaddress.ip_address(address).is_loopback for address in found)


def _account(text: str, where: str) -> tuple[str, str]:
    user, colon, password = text.strip().partition(":")
    if not colon or not user.strip() or not password:
        raise StudioError(
            f"{where} is not USER:PASSWORD (a user name, ':' and a password, neither empty; the value is not shown)"
        )
    if any(c.isspace() for c in user.strip()):
        raise StudioError(f"{where}: the user name holds a space; use letters, digits and punctuation")
    return user.strip(), password


def accounts(auth: list[str] | None, auth_file: str | None) -> list[tuple[str, str]]:
    """The ``(user, password)`` pairs of ``--auth`` and ``--auth_file``; StudioError names a bad value by where it is
    (``--auth`` number, or the file and line), never by its content."""
    found = [_account(text, f"--auth value {n}") for n, text in enumerate(auth or [], start=1)]
    if auth_file is not None:
        path = Path(auth_file).expanduser()
        try:
            if not path.is_file():
                raise StudioError(f"--auth_file '{path}' is not a file: give a file of USER:PASSWORD lines")
            if path.stat().st_size > MAX_AUTH_FILE_BYTES:
                raise StudioError(f"--auth_file '{path}' is over 1 MB: give a file of USER:PASSWORD lines")
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise StudioError(f"--auth_file '{path}' cannot be read ({type(err).__name__})") from None
        before = len(found)
        for number, line in enumerate(lines, start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                found.append(_account(line, f"--auth_file '{path}', line {number}"))
        if len(found) == before:
            raise StudioError(f"--auth_file '{path}' holds no USER:PASSWORD line")
    users = [user for user, _ in found]
    twice = sorted({user for user in users if users.count(user) > 1})
    if twice:
        raise StudioError(f"the user {twice[0]!r} is given twice (--auth, --auth_file): give each user once")
    return found


def check_exposure(host: str, port: int, logins: list, insecure_no_auth: bool) -> str | None:
    """Refuse (StudioError) to listen beyond the loopback without a login unless ``insecure_no_auth``; returns the
    warning to print when it is so, else None."""
    if logins and insecure_no_auth:
        raise StudioError("--insecure_no_auth and --auth/--auth_file contradict each other: drop one")
    if logins or is_loopback(host):
        return None
    risk = (
        f"--host {host} listens beyond this machine, and without a login anyone who can reach port {port} can "
        "upload files, start training on this machine, and delete or download every adapter in the workspace"
    )
    if not insecure_no_auth:
        raise StudioError(
            f"{risk}. Ask for a login with --auth USER:PASSWORD or --auth_file FILE (lines USER:PASSWORD); or, if "
            "only people you trust can reach this network, say so with --insecure_no_auth"
        )
    return f"warning: {risk} (--insecure_no_auth)"
