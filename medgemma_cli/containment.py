"""Native crashes contained: llama.cpp or ONNX Runtime dying is one clear line, never a bare "Segmentation fault".

Python cannot catch a segfault in C code, but a parent process can watch a child die. The `medgemma` commands
that run models execute in a child process; while working, the child notes what it is doing in a small
"stage" file (which library, doing what). If the child dies by a signal, the parent prints one line from the
last stage and exits 1. Local `batch` does the same per unit with its model worker (`batch_worker`).

MEDGEMMA_TEST_CRASH makes the code crash on purpose (a real SIGSEGV) at a named point, so that all of this is
tested on every machine, not only those whose CPU trips llama.cpp. Only tests set it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from medgemma_cli import stopping

TEST_CRASH_ENV = "MEDGEMMA_TEST_CRASH"  # comma-separated points: probe, stage:TEXT, unit:FILE-NAME
STAGE_FILE_ENV = "MEDGEMMA_STAGE_FILE"  # set by the supervising parent for its child
SUPERVISED_ENV = "MEDGEMMA_SUPERVISED"
# Commands that run native model code; the others (help, models, doctor) run in the process itself.
SUPERVISED_COMMANDS = frozenset({"ask", "chat", "batch", "bench", "demo", "classify", "embed", "convert",
                                 "extract"})

_stage_fd: int | None = None
_current: tuple[str, str] | None = None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --- deliberate crashes, for tests -------------------------------------------------------------------------

def _test_points() -> list[str]:
    return [p.strip() for p in os.environ.get(TEST_CRASH_ENV, "").split(",") if p.strip()]


def crash_if_testing(point: str) -> None:
    """Die by SIGSEGV (a real invalid read in native code) if the tests asked for a crash at `point`."""
    if point in _test_points():
        crash()


def test_crash_requested(prefix: str, text: str) -> bool:
    """Whether a test asked for a crash at a `prefix:` point matching `text` (e.g. unit:broken.dcm)."""
    return any(p.startswith(prefix + ":") and p[len(prefix) + 1:] in text for p in _test_points())


def crash() -> None:
    sys.stderr.flush()
    ctypes.string_at(0)  # reads address 0: SIGSEGV, as a bug in llama.cpp would


# --- stages ------------------------------------------------------------------------------------------------

def use_stage_file(path: str | None) -> None:
    """Write stages to `path` from now on (None: keep them in memory only)."""
    global _stage_fd
    if _stage_fd is not None:
        os.close(_stage_fd)
        _stage_fd = None
    if path:
        _stage_fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)


def _publish(value: tuple[str, str] | None) -> None:
    global _current
    _current = value
    if _stage_fd is not None:
        data = ("\t".join(value) if value else "").encode("utf-8", "replace")
        try:
            os.ftruncate(_stage_fd, 0)
            os.pwrite(_stage_fd, data, 0)
        except OSError:  # a full /tmp must not stop the work; a crash report would only be vaguer
            pass


@contextmanager
def stage(library: str, doing: str) -> Iterator[None]:
    """Mark native work: if the process dies inside, the report says "<library> crashed while <doing>"."""
    previous = _current
    _publish((library, doing))
    if test_crash_requested("stage", doing):
        crash()
    try:
        yield
    finally:
        _publish(previous)


def read_stage(path: str) -> tuple[str, str] | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read().strip()
    except OSError:
        return None
    library, _, doing = text.partition("\t")
    return (library, doing) if text and doing else None


def describe_death(signum: int, last: tuple[str, str] | None) -> str:
    """One line for a process that died by a signal, naming what it was doing."""
    name = signal_name(signum)
    if signum == signal.SIGKILL:
        what = f"was killed ({name})" + (f" while {last[1]}" if last else "")
        return f"medgemma {what}; the system may have run out of memory (see `medgemma bench` for what fits)"
    who = last[0] if last else "medgemma"
    line = f"{who} crashed ({name})" + (f" while {last[1]}" if last else "")
    return line + "; `medgemma doctor` shows why"


# --- the supervising parent --------------------------------------------------------------------------------

def command_of(argv: list[str]) -> str:
    """The `medgemma` command an argument list runs ("" for none: help)."""
    return next((a for a in argv if not a.startswith("-")), "")


def supervised_command(argv: list[str]) -> str | None:
    """The command name if `argv` runs one that should be supervised (and we are not its child already)."""
    if os.environ.get(SUPERVISED_ENV):
        return None
    command = command_of(argv)
    return command if command in SUPERVISED_COMMANDS else None


def new_stage_file() -> str:
    """A private temporary file for a child's stages; "" where none can be made (crashes are then reported
    without what was being done)."""
    try:
        fd, path = tempfile.mkstemp(prefix="medgemma-stage-")
        os.close(fd)
        return path
    except OSError:
        return ""


def remove_stage_file(path: str) -> None:
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def run_supervised(argv: list[str]) -> int:
    """Run `medgemma ARGV` in a child process sharing our terminal; report its death by a signal in one line."""
    stage_path = new_stage_file()
    env = {**os.environ, SUPERVISED_ENV: str(os.getpid()), STAGE_FILE_ENV: stage_path}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "medgemma_cli", *argv], env=env)
        forwarded = {}
        for sig in (signal.SIGTERM, signal.SIGHUP):
            # pass termination on to the child, which cleans up after itself
            forwarded[sig] = signal.signal(sig, lambda s, _f: proc.send_signal(s))
        try:
            while True:
                try:
                    rc = proc.wait()
                    break
                except KeyboardInterrupt:
                    # from a terminal the child got the same Ctrl-C and handles it; a SIGINT sent to us alone
                    # (timeout -s INT, a process manager) is passed on if the child is still running after a moment
                    try:
                        rc = proc.wait(timeout=1.0)
                        break
                    except (subprocess.TimeoutExpired, KeyboardInterrupt):
                        proc.send_signal(signal.SIGINT)
        finally:
            for sig, handler in forwarded.items():
                signal.signal(sig, handler)
        if rc >= 0:
            return rc
        signum = -rc
        if signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
            return 128 + signum
        sys.stdout.flush()
        print(f"error: {describe_death(signum, read_stage(stage_path))}", file=sys.stderr, flush=True)
        return 1
    finally:
        remove_stage_file(stage_path)


def init_child() -> None:
    """In a supervised child: publish stages to the parent's file, and die with the parent."""
    path = os.environ.get(STAGE_FILE_ENV)
    parent = os.environ.get(SUPERVISED_ENV, "")
    if parent.isdigit():
        if path:
            try:
                use_stage_file(path)
            except OSError:
                pass
        die_with_parent(int(parent))
        # Ctrl-C and SIGTERM (forwarded by the parent) unwind like an exit, so that temporary files are removed,
        # and end the native work under way rather than wait for it (stopping.py)
        stopping.install()


def die_with_parent(parent_pid: int) -> None:
    """A child whose parent was killed must not go on alone (appending to the same results, holding a model):
    Linux delivers SIGKILL when the parent goes; elsewhere a thread watches the parent."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        else:
            if os.getppid() != parent_pid:  # it went before prctl took effect
                os.kill(os.getpid(), signal.SIGKILL)
            return
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="medgemma-parent-watch", daemon=True).start()
