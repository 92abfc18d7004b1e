"""Helpers around native libraries, in a leaf module (it imports nothing of ours): the runtime and the mtmd
bindings both use them, and neither imports the other for them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_stderr(enabled: bool = True) -> Iterator[None]:
    """llama.cpp and libmtmd print to the C stderr even when asked not to; silence fd 2 around them."""
    if not enabled:
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
