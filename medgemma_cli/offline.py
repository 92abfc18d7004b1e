"""Offline means no socket. Commands that need no network cannot open one, and our dependencies' telemetry is off.

ONNX Runtime (1.29 and later) ships telemetry that writes a device id under ~/.cache/Microsoft and sends events;
`ORT_DISABLE_TELEMETRY` (1.32) and `ORT_TELEMETRY_DISABLED` (later releases) switch it off when set before its
environment is created, which `disable_telemetry()` does at the package's import.

`forbid_sockets()` installs an audit hook that refuses to create, bind or connect any socket in this process.
A library that merely probes (urllib3 binds a socket to ::1 at import to learn whether IPv6 works; pydicom
imports it when `requests` is installed) gets an error it already handles; anything else fails loudly, naming
the attempt, instead of talking to the network.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Audit events of everything that makes or uses a socket or a name lookup (CPython's documented events).
SOCKET_EVENTS = frozenset({
    "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto", "socket.sendmsg",
})
TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1", "ORT_TELEMETRY_DISABLED": "1"}


class NetworkUseError(RuntimeError):
    """Something tried to use the network in a command that must not."""


def disable_telemetry() -> None:
    """Before any ONNX Runtime environment exists; a no-op for libraries that never started one."""
    os.environ.update(TELEMETRY_OFF)
    ort = sys.modules.get("onnxruntime")
    if ort is not None and hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()


_forbidden: list[str] = []


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if _forbidden and event in SOCKET_EVENTS:
        raise NetworkUseError(f"{event} refused: `medgemma {_forbidden[0]}` works offline and opens no socket")


def forbid_sockets(command: str) -> None:
    """From now on, this process creates no socket (audit hooks cannot be removed; they last the process)."""
    if not _forbidden:
        _forbidden.append(command)
        sys.addaudithook(_hook)


def is_offline(argv: list[str]) -> tuple[bool, str]:
    """(offline?, command): every command is, except `batch --server URL`, which talks to that server only."""
    from medgemma_cli.containment import command_of

    command = command_of(argv)
    online = command == "batch" and any(a == "--server" or a.startswith("--server=") for a in argv)
    return not online, command or "--help"


@contextmanager
def no_uuid1() -> Iterator[None]:
    """onnx (and ONNX Runtime's quantizer through it) names external-data files with `uuid.uuid1()` even when
    told the name, and uuid1 asks the uuidd daemon over a socket and reads the MAC address. Inside this block
    it returns a random uuid4 instead: the value only ever names a file that we rename anyway."""
    import uuid

    original = uuid.uuid1

    def random_uuid(node: int | None = None, clock_seq: int | None = None) -> uuid.UUID:
        return uuid.uuid4()

    uuid.uuid1 = random_uuid
    try:
        yield
    finally:
        uuid.uuid1 = original


@contextmanager
def without_http_clients() -> Iterator[None]:
    """Imports inside this block see no `requests`: pydicom imports it (for downloading its test files, which we
    never do), and with it urllib3, whose import binds a socket to probe for IPv6. Only modules that were not
    imported yet are hidden, and only for the duration of the block."""
    hidden = [name for name in ("requests", "urllib3") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, 0) is None:
                del sys.modules[name]


def import_pydicom() -> Any:
    """pydicom with its pixel handlers, imported without an HTTP client (see `without_http_clients`)."""
    if "pydicom.pixels" not in sys.modules:
        with without_http_clients():
            import pydicom.data  # imported here, so that nothing imports it later with requests
            import pydicom.pixels
    import pydicom

    return pydicom
