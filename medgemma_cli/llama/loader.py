"""Every llama.cpp model load goes through here, so that it uses only what is safe on the CPU in front of us.

ggml's "extra" CPU buffer types hold weights in layouts made for one instruction set (AMX tiles on Intel
Xeons since Sapphire Rapids, repacked AVX/NEON blocks elsewhere). They make prompts faster where they work,
and on some machines they crash: ggml's AMX matmul segfaults on the first multi-token batch of a Q8_0 or Q4_K
model (llama.cpp issue 20824, closed without a fix). Whether they are safe is decided once per machine and
llama.cpp build by a child process (`llama_probe`), cached, and applied to every load; MEDGEMMA_EXTRA_BUFFERS
(auto | on | off) overrides the decision.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from medgemma_cli.atomic import replace_text
from medgemma_cli.errors import InputError, MedgemmaError
from medgemma_cli.machine import cpu_flags

ENV = "MEDGEMMA_EXTRA_BUFFERS"
VERDICT_FILE_ENV = "MEDGEMMA_VERDICT_FILE"  # where the verdicts are kept (default: the store's cache folder)
PROBE_TIMEOUT_S = 60.0
CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class Verdict:
    """Whether llama.cpp may use its extra CPU buffer types here, and why."""

    enabled: bool
    source: str  # environment | probe | cache | not probed
    reason: str
    key: str = ""
    buffer_types: tuple[str, ...] = ()  # the weight buffers the probe saw llama.cpp use with them on
    probe_seconds: float | None = None
    cacheable: bool = True  # a probe that timed out or could not run says nothing about the CPU: ask again later

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- what this machine is ----------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def llama_build() -> dict[str, str]:
    """The llama.cpp that llama-cpp-python ships: its version and the features it was compiled with."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info()
    return {"version": str(getattr(llama_cpp, "__version__", "?")),
            "system_info": (info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)).strip()}


def machine_key() -> str:
    """What a verdict depends on: the CPU's features, the llama.cpp build, the architecture."""
    build = llama_build()
    text = "\n".join([platform.machine(), build["version"], build["system_info"], " ".join(sorted(cpu_flags()))])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# --- the verdict -------------------------------------------------------------------------------------------

def verdict_file() -> Path:
    env = os.environ.get(VERDICT_FILE_ENV)
    if env:
        return Path(env).expanduser()
    from medgemma_cli import store

    return store.cache_dir() / "extra-buffers.json"


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(verdict_file().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, v: Verdict) -> None:
    """Atomically, so two processes probing at once leave one whole file; a read-only store only costs a re-probe."""
    path = verdict_file()
    data = _read_cache()
    data[key] = {k: val for k, val in v.as_dict().items() if k not in ("source", "key", "cacheable")}
    data[key]["probed_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, json.dumps(data, indent=1))
    except OSError:
        pass


def _from_env() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise MedgemmaError(f"{ENV}={value!r}: use one of {', '.join(CHOICES)}")
    return value


_lock = threading.Lock()
_decided: dict[str, Verdict] = {}


def verdict(probe: bool = True) -> Verdict:
    """The decision for this process: the environment's, else the cached probe's, else a new probe's.

    With `probe=False` a missing verdict is reported as such ("not probed") and extra buffers count as off."""
    choice = _from_env()
    if choice != "auto":
        return Verdict(choice == "on", "environment", f"{ENV}={choice}")
    key = machine_key()
    with _lock:
        if key in _decided:
            return _decided[key]
        cached = _read_cache().get(key)
        if isinstance(cached, dict) and isinstance(cached.get("enabled"), bool):
            v = Verdict(cached["enabled"], "cache", str(cached.get("reason", "")), key,
                        tuple(cached.get("buffer_types") or ()), cached.get("probe_seconds"))
        elif not probe:
            return Verdict(False, "not probed", "no probe has run on this machine and llama.cpp build yet", key)
        else:
            v = run_probe(key)
            if v.cacheable:
                _write_cache(key, v)
        _decided[key] = v
        return v


def remember(key: str, v: Verdict) -> None:
    """Keep a fresh probe's verdict for this process and the next ones."""
    with _lock:
        _write_cache(key, v)
        _decided[key] = v


def forget() -> None:
    """Drop this process's remembered decision (tests; `medgemma doctor --reprobe`)."""
    with _lock:
        _decided.clear()


STOPPED_BY = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL)  # signals sent to it, not crashes


def run_probe(key: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> Verdict:
    """Try llama.cpp's extra buffer types in a child process on small Q8_0/Q4_K models.

    The child dying by a signal, hanging, or computing other logits than the plain CPU path all mean "off"."""
    from medgemma_cli.containment import signal_name

    key = key or machine_key()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medgemma-probe-") as work:
        try:
            r = subprocess.run([sys.executable, "-m", "medgemma_cli.llama.probe", work], capture_output=True,
                               text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return Verdict(False, "probe", f"the probe did not finish within {timeout:.0f} s", key,
                           probe_seconds=round(time.perf_counter() - t0, 2), cacheable=False)
    seconds = round(time.perf_counter() - t0, 2)
    if r.returncode < 0 and -r.returncode in STOPPED_BY:
        # Ctrl-C at the terminal reaches the probe too, and a kill ends it: the user's doing, not llama.cpp's, so
        # it is not kept as this machine's verdict (it would turn the extra buffers off for good)
        return Verdict(False, "probe", f"the probe was stopped ({signal_name(-r.returncode)}) before it finished",
                       key, probe_seconds=seconds, cacheable=False)
    if r.returncode < 0:
        return Verdict(False, "probe", f"llama.cpp crashed ({signal_name(-r.returncode)}) with extra buffer types on",
                       key, probe_seconds=seconds)
    try:
        report = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return Verdict(False, "probe", f"the probe failed (exit {r.returncode}: {tail})", key, probe_seconds=seconds,
                       cacheable=False)
    types = tuple(report.get("buffer_types") or ())
    if not report.get("same_logits"):
        return Verdict(False, "probe", f"extra buffer types gave other logits (max difference "
                       f"{report.get('max_difference')})", key, types, seconds)
    extra = [t for t in types if t not in ("CPU", "CPU_Mapped")]
    reason = f"a Q8_0 + Q4_K model ran with them ({', '.join(extra)})" if extra else \
        "a Q8_0 + Q4_K model ran with them (this CPU has none that those types use)"
    return Verdict(True, "probe", reason, key, types, seconds)


# --- loading -----------------------------------------------------------------------------------------------

_patch_lock = threading.RLock()  # a load inside a load (re-entrant) must not wait for itself


def _without_extra_buffers(original: Callable[[], Any]) -> Callable[[], Any]:
    def defaults() -> Any:
        params = original()
        params.use_extra_bufts = False  # weights stay in the plain CPU buffer: no AMX, no repacking
        return params

    return defaults


@contextmanager
def extra_buffers(enabled: bool) -> Iterator[None]:
    """llama-cpp-python's Llama() exposes no `use_extra_bufts`; it takes llama.cpp's default model params, so
    for the duration of one load those defaults are ours. Loads are serialised by a lock."""
    import llama_cpp.llama_cpp as lc

    if enabled:
        yield
        return
    with _patch_lock:
        original = lc.llama_model_default_params
        lc.llama_model_default_params = _without_extra_buffers(original)
        try:
            yield
        finally:
            lc.llama_model_default_params = original


@contextmanager
def buffer_types_used() -> Iterator[list[str]]:
    """The weight buffers llama.cpp reports while loading inside this block ("CPU_Mapped", "CPU_REPACK", "AMX"…),
    read from its log; llama-cpp-python's own log handler is put back afterwards."""
    import ctypes
    import re

    import llama_cpp
    from llama_cpp import _logger

    seen: list[str] = []

    @llama_cpp.llama_log_callback
    def log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        m = re.search(r"(\S+) model buffer size", (text or b"").decode("utf-8", "replace"))
        if m:
            seen.append(m.group(1))

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    try:
        yield seen
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def kv_cache_params(kv_type: str = "f16") -> dict[str, Any]:
    """llama-cpp-python's context parameters for a KV cache type. "f16" is llama.cpp's default (and today's
    arithmetic, attention without flash); "q8_0" halves the cache, which llama.cpp allows for V only with flash
    attention, so flash attention comes with it (both change the logits slightly; see the README's tolerance)."""
    import llama_cpp

    if kv_type == "f16":
        return {}
    if kv_type == "q8_0":
        return {"type_k": llama_cpp.GGML_TYPE_Q8_0, "type_v": llama_cpp.GGML_TYPE_Q8_0, "flash_attn": True}
    raise MedgemmaError(f"unknown KV cache type {kv_type!r}; choose f16 or q8_0")


def load_llama(path: Path | str, use_extra_buffers: bool | None = None, **kwargs: Any) -> Any:
    """`llama_cpp.Llama(path, **kwargs)` with the extra-buffer verdict applied (or `use_extra_buffers`, for
    benchmarks that compare both where both are safe).

    A vocabulary-only load computes nothing, so it needs no verdict (and triggers no probe)."""
    import llama_cpp

    if use_extra_buffers is not None:
        enabled = use_extra_buffers
    else:
        enabled = True if kwargs.get("vocab_only") else verdict().enabled
    if enabled and not kwargs.get("vocab_only"):
        # with extra buffers, llama.cpp copies most weights into repacked buffers but keeps the whole file
        # mapped, and the pages it read to repack stay resident: 4.35 GB for a 2.49 GB 4B Q4_K_M instead of
        # 2.83 GB when the file is read rather than mapped (benchmarks/memory_4b.py). Same weights, same logits.
        kwargs.setdefault("use_mmap", False)
    try:
        with extra_buffers(enabled):
            return llama_cpp.Llama(str(path), **kwargs)
    except (ValueError, UnicodeDecodeError) as e:  # llama-cpp-python's "Failed to load model", bad metadata
        raise InputError(path, f"llama.cpp could not load this model ({type(e).__name__}); the file is corrupt "
                               "or not a MedGemma GGUF") from None


def apply_to_process() -> Verdict:
    """For a process that loads models through code we do not control (llama-cpp-python's server): every
    later load in this process follows the verdict."""
    import llama_cpp.llama_cpp as lc

    v = verdict()
    if not v.enabled:
        lc.llama_model_default_params = _without_extra_buffers(lc.llama_model_default_params)
    return v
