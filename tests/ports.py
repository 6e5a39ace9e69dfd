"""Ports for the tests' servers (daemons, torch.distributed's store)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a port from that range (bind to
    port 0) can be taken as the source port of any connection made before the daemon
    binds it, and the suite makes many. Never one handed out before in this process."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(1000):
        port = random.randrange(max(1024, low - 12000), low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port found below {low}")
