"""Who may talk to the server: where the API key lives, and which Host headers are answered.

The key is kept outside the run folder (in the user's configuration folder by default), so a run folder can be
copied or shared without it. Requests must name an allowed host in their ``Host`` header: the loopback names
and the address the server is bound to, plus any ``--allowed-host``. A web page on another site that points its
own name at 127.0.0.1 (DNS rebinding) sends its own name, and is refused. Which requests need the key is
``needs_key``; ``pinsface.serve.guard`` checks it and writes it into the API description.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
READ_METHODS = ("GET", "HEAD", "OPTIONS")


def default_key_file() -> Path:
    """``$XDG_CONFIG_HOME/pinsface/api_key`` (default ``~/.config/pinsface/api_key``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "pinsface" / "api_key"


def load_or_create_key(path: Path) -> str:
    """The API key in ``path``; a new random one, written readable by the owner only, if there is none."""
    path = Path(path)
    try:
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it just now
            return load_or_create_key(path)
        new = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new + "\n")
        log.warning("created an API key in %s (readable by its owner only)", path)
        return new
    if len(key) < 16:
        raise ValueError(f"the API key in {path} is shorter than 16 characters")
    return key


def server_key(key_file: str | None, run_dir: Path) -> str:
    """The key of a server over ``run_dir``: from ``key_file``, or the default file (``default_key_file``)."""
    key = load_or_create_key(Path(key_file) if key_file else default_key_file())
    if (run_dir / "api_key").exists() and not key_file:
        log.warning(
            "%s is no longer read (a copy of the run would carry it): the key is in %s; delete the old one",
            run_dir / "api_key",
            default_key_file(),
        )
    return key


def needs_key(path: str, method: str, auth: str) -> bool:
    """Whether a request needs the API key, under ``auth`` "all" (every API endpoint) or "write" (those that
    change state). The page, its assets and the API description hold no data and never need it."""
    if not (path.startswith("/v1/") or path == "/metrics"):
        return False
    if auth == "all":
        return True
    # Naming faces changes nothing; every other method than a read does.
    return method not in READ_METHODS and path != "/v1/identify"


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
