"""What the server lets through: who may ask (the bearer token) and which files it may hand out.

Why so strict for a local tool: a browser on the same machine can be steered by any web page to the
server's port, and a server bound to a network interface is reachable by everyone on it. So a non-local
bind refuses to start without a token, and every file path a request names is resolved (symlinks
included) and must land inside one of the project's readable folders; anything else is a plain 404,
the same answer as a file that does not exist, so a probe learns nothing.
"""

from __future__ import annotations

import hmac
import os
import re
from pathlib import Path, PurePosixPath

from dermkohya.errors import DermkohyaError

TOKEN_ENV = "DERMKOHYA_TOKEN"
COOKIE = "dermkohya_token"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# The folders of a project the server reads; output/ only for logs, samples and launch manifests.
AREAS = ("runs", "output", "artifacts", "plans", "synthetic", "reports")
OUTPUT_SUFFIXES = frozenset({".log", ".json", ".png", ".jpg", ".jpeg", ".webp", ".txt"})
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TokenRequired(DermkohyaError):
    """A non-local bind without a token."""


class NotFound(Exception):
    """A path outside what the server may read (or simply missing): answered 404."""


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token."""
    if host not in LOCAL_HOSTS and not token:
        raise TokenRequired(
            f"dermkohya serve --host {host}: binding beyond localhost needs a token: "
            f"set {TOKEN_ENV} to a long random string (e.g. `export {TOKEN_ENV}=$(openssl rand -hex 24)`), "
            "or bind to 127.0.0.1"
        )


def token_from_env() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


def authorised(token: str | None, header: str | None, cookie: str | None) -> bool:
    """A request carries the token as `Authorization: Bearer …` (API clients) or the UI's cookie."""
    if not token:
        return True
    offered = ""
    if header and header.lower().startswith("bearer "):
        offered = header[7:].strip()
    elif cookie:
        offered = cookie
    return hmac.compare_digest(offered.encode(), token.encode())


def check_name(name: str) -> str:
    """A run, plan, set or report name: letters, digits, '.', '_' or '-', never '.' or '..'."""
    if not NAME_RE.match(name) or name in (".", ".."):
        raise NotFound(name)
    return name


def safe_file(root: Path, area: str, relative: str) -> Path:
    """`relative` inside the project's `area`, as a real file whose resolved path stays inside that area."""
    if area not in AREAS or not relative or "\\" in relative or "\x00" in relative:
        raise NotFound(relative)
    parts = PurePosixPath(relative)
    if parts.is_absolute() or any(part in ("..", "") for part in parts.parts):
        raise NotFound(relative)
    base = (Path(root) / area).resolve()
    try:
        resolved = (base / parts).resolve(strict=True)
    except (OSError, RuntimeError):
        raise NotFound(relative) from None
    if not resolved.is_relative_to(base) or not resolved.is_file():
        raise NotFound(relative)
    if area == "output" and resolved.suffix.lower() not in OUTPUT_SUFFIXES:
        raise NotFound(relative)  # output/ holds kohya's checkpoints and state too: only logs, samples, manifests
    return resolved


def safe_dir(root: Path, area: str, name: str) -> Path:
    """The folder `area/name` of the project, inside the area once resolved."""
    check_name(name)
    base = (Path(root) / area).resolve()
    resolved = (base / name).resolve()
    if not resolved.is_relative_to(base) or not resolved.is_dir():
        raise NotFound(name)
    return resolved
