"""What this machine is: cores, memory, the CPU and its features (for threads, the probe key and `doctor`)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

# Flags that decide which of ggml's and ONNX Runtime's kernels run, as /proc/cpuinfo names them.
X86_FEATURES = {"AVX2": "avx2", "AVX-512": "avx512f", "AVX-512 VNNI": "avx512_vnni", "AVX-VNNI": "avx_vnni",
                "AVX-512 BF16": "avx512_bf16", "AMX-INT8": "amx_int8", "AMX-BF16": "amx_bf16"}
ARM_FEATURES = {"NEON": "asimd", "dot product": "asimddp", "i8mm": "i8mm", "SVE": "sve"}


def physical_cores() -> int:
    """Physical cores (llama.cpp is fastest with one thread per core, not per hyper-thread)."""
    try:
        pairs = set()
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
            elif not line.strip() and core is not None:
                pairs.add((phys, core))
                phys = core = None
        if core is not None:
            pairs.add((phys, core))
        if pairs:
            return min(len(pairs), os.cpu_count() or len(pairs))
    except OSError:
        pass
    return os.cpu_count() or 1


def total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def available_memory_bytes() -> int:
    """Memory the kernel can give a new process without swapping (MemAvailable; Linux), else the total."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return total_memory_bytes()


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (Linux); empty where there is no /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("model name", "Hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def cpu_features() -> dict[str, bool]:
    """The kernel-relevant features by name; empty where the OS does not list CPU flags."""
    flags = cpu_flags()
    names = ARM_FEATURES if platform.machine().lower() in ("aarch64", "arm64") else X86_FEATURES
    return {name: flag in flags for name, flag in names.items()} if flags else {}
