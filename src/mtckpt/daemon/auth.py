"""Who may talk to a daemon, without gRPC: the shared token, the TLS files, and whether an
address is reachable from this machine only (where ``--insecure`` is allowed)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for mutual TLS between daemons: this side's certificate and key, and the
    CA that signed the other side's."""

    cert: str
    key: str
    ca: str

    def read(self) -> tuple[bytes, bytes, bytes]:
        return tuple(Path(p).read_bytes() for p in (self.cert, self.key, self.ca))  # type: ignore[return-value]


def host_of(address: str) -> str:
    """The host of ``host:port`` (``[v6]:port`` -> ``v6``)."""
    return address.rsplit(":", 1)[0].strip("[]")


MIN_TOKEN = 16  # characters: `openssl rand -hex 32` gives 64
MAX_TOKEN = 4096


def read_token(path: str | None) -> str | None:
    """The shared token in the file at ``path`` (None: no token); ConfigError naming the
    file if it cannot be a token (too short to resist guessing, or not printable ASCII,
    which gRPC metadata cannot carry)."""
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token file {path}: cannot read a token: {exc}") from None
    if not MIN_TOKEN <= len(token) <= MAX_TOKEN or not all(" " < c < "\x7f" for c in token):
        raise ConfigError(
            f"token file {path}: a token is {MIN_TOKEN} to {MAX_TOKEN} printable ASCII "
            f"characters without spaces (found {len(token)} characters); make one with "
            "`openssl rand -hex 32`"
        )
    return token


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
