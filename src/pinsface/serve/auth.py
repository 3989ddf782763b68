"""Who may talk to the server: where the API key lives, and which Host headers are answered.

The key is kept outside the run folder (in the user's configuration folder by default), so a run folder can be
copied or shared without it. Requests must name an allowed host in their ``Host`` header: the loopback names
and the address the server is bound to, plus any ``--allowed-host``. A web page on another site that points its
own name at 127.0.0.1 (DNS rebinding) sends its own name, and is refused.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def default_key_file() -> Path:
    """``$XDG_CONFIG_HOME/pinsface/api_key`` (default ``~/.config/pinsface/api_key``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "pinsface" / "api_key"


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, extra: tuple[str, ...] | list[str] = ()) -> frozenset[str]:
    """The host names (lower case, without port or brackets) a request may name."""
    names = {*LOOPBACK_NAMES, bind, *extra}
    return frozenset(n.strip().strip("[]").lower() for n in names if n and n.strip() not in ("0.0.0.0", "::"))


def host_of(header: bytes | None) -> str | None:
    """The host name in a ``Host`` header, without its port; None when there is none or it is malformed."""
    if not header:
        return None
    try:
        text = header.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):  # [::1]:8000
        end = text.find("]")
        return text[1:end] if end > 0 else None
    name, _, port = text.partition(":")
    if port and not port.isdigit():
        return None
    return name or None


def exposure_warning(bind: str, auth: str) -> str | None:
    """What to warn of when the server is bound beyond this machine with reads open (``auth`` "write")."""
    if is_loopback(bind) or auth == "all":
        return None
    return (
        f"serving on {bind}, beyond this machine, with --public-read: anyone who can reach it can list the "
        "people it knows and name faces without a key"
    )
