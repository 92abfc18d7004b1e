"""A free TCP port on 127.0.0.1, for the servers tests start (never anything beyond this machine)."""

from __future__ import annotations


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

