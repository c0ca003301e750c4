"""Loopback ports for test servers; stdlib only (tests/kv_events imports it from LMCache's venv).

A port from `bind(0)` comes from the kernel's ephemeral range, the same range outgoing
connections take their source ports from; ZeroMQ clients reconnecting to a server that is not
listening yet take many of them, so such a port can be taken between the pick and the server's
bind ("Address already in use", seen in CI). These ports come from below the ephemeral range, are
checked free by binding, and are never handed out twice in one process.
"""

from __future__ import annotations

import random
import socket
import threading

_lock = threading.Lock()
_given: set[int] = set()


def _range() -> tuple[int, int]:
    lo = 32768
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return (10000, lo) if lo > 12000 else (lo + 30000, 65000) if lo + 30000 < 65000 else (10000, 65000)


def free_port() -> int:
    start, end = _range()
    with _lock:
        for _ in range(10_000):
            port = random.randrange(start, end)
            if port in _given:
                continue
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _given.add(port)
            return port
    raise RuntimeError(f"no free loopback port in {start}..{end}")
