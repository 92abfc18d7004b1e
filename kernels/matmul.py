"""Quantized matrix products through ggml's CPU kernels (the ones llama.cpp runs), for `medgemma bench`.

A ggml context with the weights, an activation matrix and one mul_mat node, computed with
ggml_graph_compute_with_ctx: the same vec_dot/gemm code paths as a model layer, without the model.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from medgemma_cli.kernels import ggml
from medgemma_cli.kernels.ggml import GgmlLibraryError


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@lru_cache(maxsize=1)
def _cpu() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    base = ggml.lib()
    name = {"darwin": "libggml-cpu.dylib", "win32": "ggml-cpu.dll"}.get(sys.platform, "libggml-cpu.so")
    path = Path(base._name).parent / name
    if not path.is_file():
        raise GgmlLibraryError(f"{path}: ggml's CPU backend library was not found next to libggml-base")
    cpu = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn, args, res in [
        ("ggml_init", [_InitParams], p), ("ggml_free", [p], None),
        ("ggml_new_tensor_2d", [p, ctypes.c_int, i64, i64], p), ("ggml_mul_mat", [p, p, p], p),
        ("ggml_new_graph", [p], p), ("ggml_build_forward_expand", [p, p], None),
        ("ggml_get_data", [p], p), ("ggml_nbytes", [p], ctypes.c_size_t),
        ("ggml_tensor_overhead", [], ctypes.c_size_t), ("ggml_graph_overhead", [], ctypes.c_size_t),
    ]:
        f = getattr(base, fn)
        f.argtypes, f.restype = args, res
    cpu.ggml_graph_compute_with_ctx.argtypes = [p, p, ctypes.c_int]
    cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
    cpu.ggml_cpu_init.argtypes, cpu.ggml_cpu_init.restype = [], None
    cpu.ggml_cpu_init()
    return base, cpu


def mul_mat(weights: np.ndarray, qtype: Q, k: int, x: np.ndarray, threads: int = 1,
            repeats: int = 1) -> tuple[np.ndarray, float]:
    """x @ Wᵀ with W stored as `qtype` rows of k values (weights: [n, row bytes] uint8, or float arrays).

    Returns the product [m, n] and the best time of `repeats` runs in seconds."""
    base, cpu = _cpu()
    w = np.ascontiguousarray(weights).view(np.uint8).reshape(weights.shape[0], -1)
    n = w.shape[0]
    xa = np.ascontiguousarray(x, dtype=np.float32)
    m = xa.shape[0]
    mem = (w.nbytes + xa.nbytes + 4 * m * n + 8 * m * k + 4 * base.ggml_tensor_overhead() + base.ggml_graph_overhead()
           + (64 << 20))
    ctx = base.ggml_init(_InitParams(mem, None, False))
    if not ctx:
        raise MemoryError("ggml_init failed")
    try:
        a = base.ggml_new_tensor_2d(ctx, int(qtype), k, n)
        b = base.ggml_new_tensor_2d(ctx, int(Q.F32), k, m)
        if base.ggml_nbytes(a) != w.nbytes:
            raise ValueError(f"weights have {w.nbytes} bytes, ggml expects {base.ggml_nbytes(a)}")
        ctypes.memmove(base.ggml_get_data(a), w.ctypes.data, w.nbytes)
        ctypes.memmove(base.ggml_get_data(b), xa.ctypes.data, xa.nbytes)
        out = base.ggml_mul_mat(ctx, a, b)
        graph = base.ggml_new_graph(ctx)
        base.ggml_build_forward_expand(graph, out)
        best = float("inf")
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            if cpu.ggml_graph_compute_with_ctx(ctx, graph, int(threads)) != 0:
                raise RuntimeError("ggml graph compute failed")
            best = min(best, time.perf_counter() - t0)
        result = np.ctypeslib.as_array(ctypes.cast(base.ggml_get_data(out), ctypes.POINTER(ctypes.c_float)),
                                       shape=(m * n,)).reshape(m, n).copy()
        return result, best
    finally:
        base.ggml_free(ctx)


@dataclass(frozen=True)
class MatmulFigure:
    type: str
    threads: int
    m: int  # activation rows: 1 = decoding one token, more = prompt processing
    seconds: float
    gflops: float
    weight_gbps: float  # weight bytes streamed per second


def matmul_throughput(qtype: Q, k: int = 2560, n: int = 10240, m: int = 1, threads: int | None = None,
                      repeats: int = 5) -> MatmulFigure:
    """One MedGemma-4B FFN matrix (2560 → 10240 by default) quantized to `qtype`, multiplied by m rows."""
    threads = threads or os.cpu_count() or 1
    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((n, k), dtype=np.float32)
    if qtype == Q.F32:
        w = w32.view(np.uint8)
    elif qtype == Q.F16:
        w = w32.astype(np.float16).view(np.uint8)
    else:
        w = ggml.quantize(w32, int(qtype), threads=threads)
    x = rng.standard_normal((m, k), dtype=np.float32)
    mul_mat(w, qtype, k, x, threads, 1)  # warm-up (threads, caches)
    _, t = mul_mat(w, qtype, k, x, threads, repeats)
    return MatmulFigure(qtype.name, threads, m, t, 2.0 * m * n * k / t / 1e9, w.nbytes / t / 1e9)
