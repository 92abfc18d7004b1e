"""Ctrl-C and SIGTERM take effect within about a second, even while the main thread is inside native code.

Python runs a signal's handler only when the main thread is back in the interpreter, and one ONNX Runtime run
of an 896 px image, or one llama_decode of a 512-token batch, can keep it away for a minute on a loaded CPU.
CPython's own C-level handler does run at once, though, and with `signal.set_wakeup_fd` it writes the signal's
number to a pipe. A watcher thread reads that pipe (both libraries release the GIL while they compute), marks
the stop requested and calls the stop hooks of the native work in progress: ONNX Runtime runs get a
`RunOptions` whose `terminate` it sets (checked between graph nodes), llama.cpp's multi-token decodes an abort
callback that ggml calls between graph nodes. The native call then returns early with an error, and the stop
is raised as the signal's own exception (KeyboardInterrupt: exit 130; `Terminated`: exit 128 + the signal), so
the command unwinds and cleans up exactly as when the signal arrived between two native calls.

Inside `abortable()` (the blocks around those native calls) the handlers record the signal instead of raising:
raised inside ggml's callback the exception would be swallowed by ctypes, and raised after the native call
failed it would be raised twice. The block raises it once, at its end.

Only the supervised child of a command installs this (`install`); elsewhere (the Python API) nothing changes.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(SystemExit):
    """SIGTERM (or another stop signal but Ctrl-C) asked the command to end; its code is 128 + the signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


# re-entrant: the signal handler (request) runs on the main thread, possibly while that thread is inside on_stop
# holding the lock; a plain Lock would then wait on itself for good
_lock = threading.RLock()
_installed = False
_requested = 0  # the first stop signal received, 0 for none
_deferring = 0  # how many abortable() blocks the main thread is in
_handler_ran = False  # the Python-level handler has run since the stop was requested
_preempted = False  # a block raised the stop before its signal's handler ran: that handler must not raise again
_hooks: dict[int, Callable[[], None]] = {}
_next_hook = 0


def install() -> None:
    """Handle Ctrl-C and SIGTERM as stops (main thread only): raised at once in Python code, and ending the native
    work under way otherwise."""
    global _installed
    if _installed:
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C handler must never block
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read_fd,), name="medgemma-stop-watch", daemon=True).start()
    _installed = True


def active() -> bool:
    """Whether stops are watched in this process (only then are native calls given a way to end early)."""
    return _installed


def requested() -> int:
    """The stop signal received (0: none)."""
    return _requested


def request(signum: int) -> None:
    """Mark a stop requested by `signum` and end the native work in progress (from any thread)."""
    global _requested
    with _lock:
        if _requested:
            return
        _requested = signum
        hooks = list(_hooks.values())
    for hook in hooks:
        hook()


def stop_exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


@contextmanager
def on_stop(hook: Callable[[], None]) -> Iterator[None]:
    """Call `hook` (from the watcher thread) if a stop is requested while the block runs; at once if it already
    was."""
    global _next_hook
    with _lock:
        key = _next_hook
        _next_hook += 1
        _hooks[key] = hook
        already = _requested
    if already:
        hook()
    try:
        yield
    finally:
        with _lock:
            _hooks.pop(key, None)


@contextmanager
def abortable() -> Iterator[None]:
    """Around native calls that end early on a stop: a stop requested meanwhile is raised once, at the end (also
    in place of the error the native call ended with)."""
    global _deferring
    _deferring += 1
    try:
        yield
    except Exception:
        _deferring -= 1
        if _requested:
            _raise_stop()
        raise
    except BaseException:
        _deferring -= 1
        raise
    _deferring -= 1
    if _requested:
        _raise_stop()


def check() -> None:
    """Raise a stop requested but not raised yet: the handler's exception is lost when it runs inside a ctypes
    callback (llama-cpp-python's log callback is one), so loops over native calls look here too."""
    if _requested and not _deferring:
        _raise_stop()


def run_onnx(session: Any, feeds: dict[str, Any]) -> list[Any]:
    """ONNX Runtime's `session.run(None, feeds)`, ended between two graph nodes by a stop (one 896 px image takes
    a minute on a loaded CPU), which is then raised as the signal's own exception."""
    import onnxruntime as ort

    options = ort.RunOptions()
    with abortable(), on_stop(lambda: setattr(options, "terminate", True)):
        return list(session.run(None, feeds, options))


def _raise_stop() -> None:
    global _preempted
    _preempted = not _handler_ran
    raise stop_exception(_requested) from None


def _handler(signum: int, frame: Any) -> None:
    global _handler_ran, _preempted
    request(signum)
    _handler_ran = True
    if _preempted:  # the stop this delivery asked for was raised already, by the block it interrupted
        _preempted = False
        return
    if not _deferring:
        raise stop_exception(signum)


def _watch(fd: int) -> None:
    """Read the signal numbers CPython's C handler writes, the moment it writes them."""
    stops = {int(s) for s in STOP_SIGNALS}
    while True:
        try:
            data = os.read(fd, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data:
            return
        for signum in data:
            if signum in stops:
                request(signum)
