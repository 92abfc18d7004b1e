"""ctypes bindings to the ggml library that llama-cpp-python installs (libggml-base).

We use ggml's own code where being identical to llama.cpp matters: reading GGUF metadata exactly as
llama.cpp will (and without materialising a 262k-token vocabulary as Python objects).
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_cli.errors import MedgemmaError


class GgmlLibraryError(MedgemmaError):
    pass


def _candidates() -> list[Path]:
    names = {"darwin": ["libggml-base.dylib"], "win32": ["ggml-base.dll"]}.get(sys.platform, ["libggml-base.so"])
    dirs = []
    try:
        import llama_cpp

        dirs.append(Path(llama_cpp.__file__).parent / "lib")
    except ImportError:
        pass
    if os.environ.get("MEDGEMMA_GGML_LIB"):
        return [Path(os.environ["MEDGEMMA_GGML_LIB"])]
    return [d / n for d in dirs for n in names]


TESTED_LLAMA_CPP_PYTHON = "0.3.36"  # the ggml our byte-for-byte and parity tests ran against


def check_version(version: str | None = None) -> None:
    """Refuse an untested ggml: quantized bytes, GGUF parsing and kernels are checked against this one.
    MEDGEMMA_ALLOW_UNTESTED_GGML=1 lets a user go on anyway."""
    if version is None:
        try:
            import llama_cpp

            version = getattr(llama_cpp, "__version__", None)
        except ImportError:
            version = None
    if version != TESTED_LLAMA_CPP_PYTHON and not os.environ.get("MEDGEMMA_ALLOW_UNTESTED_GGML"):
        raise GgmlLibraryError(
            f"llama-cpp-python {version or 'unknown'} is installed, but medgemma-cli is tested with "
            f"{TESTED_LLAMA_CPP_PYTHON}: pip install llama-cpp-python=={TESTED_LLAMA_CPP_PYTHON} "
            "(or set MEDGEMMA_ALLOW_UNTESTED_GGML=1 to try anyway)")


@lru_cache(maxsize=1)
def lib() -> ctypes.CDLL:
    """libggml-base, found next to llama-cpp-python's libllama (or at MEDGEMMA_GGML_LIB)."""
    if not os.environ.get("MEDGEMMA_GGML_LIB"):
        check_version()
    for path in _candidates():
        if path.is_file():
            try:
                handle = ctypes.CDLL(str(path))
            except OSError as e:
                raise GgmlLibraryError(f"{path}: cannot load ggml ({e})") from e
            _declare(handle)
            return handle
    raise GgmlLibraryError("ggml's library (libggml-base) was not found; reinstall llama-cpp-python "
                           "(pip install --force-reinstall llama-cpp-python==0.3.36)")


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", _TO_FLOAT),
                ("from_float_ref", ctypes.c_void_p)]


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _declare(h: ctypes.CDLL) -> None:
    p, i64, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
    sigs = {
        "gguf_init_from_file": ([ctypes.c_char_p, _GgufInitParams], p),
        "gguf_free": ([p], None),
        "gguf_get_n_kv": ([p], i64),
        "gguf_get_key": ([p, i64], ctypes.c_char_p),
        "gguf_find_key": ([p, ctypes.c_char_p], i64),
        "gguf_get_kv_type": ([p, i64], ctypes.c_int),
        "gguf_get_arr_type": ([p, i64], ctypes.c_int),
        "gguf_get_val_data": ([p, i64], p),
        "gguf_get_val_str": ([p, i64], ctypes.c_char_p),
        "gguf_get_arr_n": ([p, i64], sz),
        "gguf_get_arr_data": ([p, i64], p),
        "gguf_get_arr_str": ([p, i64, sz], ctypes.c_char_p),
        "gguf_get_n_tensors": ([p], i64),
        "gguf_get_data_offset": ([p], sz),
        "gguf_get_tensor_name": ([p, i64], ctypes.c_char_p),
        "gguf_get_tensor_type": ([p, i64], ctypes.c_int),
        "gguf_get_tensor_offset": ([p, i64], sz),
        "gguf_get_tensor_size": ([p, i64], sz),
        "gguf_get_tensor_ne": ([p, i64], ctypes.POINTER(ctypes.c_int64)),
        "ggml_quantize_chunk": ([ctypes.c_int, p, p, i64, i64, i64, p], sz),
        "ggml_quantize_requires_imatrix": ([ctypes.c_int], ctypes.c_bool),
        "ggml_row_size": ([ctypes.c_int, i64], sz),
        "ggml_blck_size": ([ctypes.c_int], i64),
        "ggml_get_type_traits": ([ctypes.c_int], ctypes.POINTER(_TypeTraits)),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(h, name)
        fn.argtypes, fn.restype = args, res


def row_size(qtype: int, n_per_row: int) -> int:
    return int(lib().ggml_row_size(int(qtype), n_per_row))


def quantize(rows: np.ndarray, qtype: int, *, imatrix: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
    """Quantize float32 rows [n_rows, n_per_row] with ggml's own kernels (the code llama-quantize runs).

    Row ranges go to a thread pool; ctypes releases the GIL, and each row's bytes do not depend on how
    the rows are split, so the result is identical whatever the thread count.
    """
    h = lib()
    x = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n_per_row = x.shape
    if n_per_row % int(h.ggml_blck_size(int(qtype))):
        raise ValueError(f"rows of {n_per_row} are not whole blocks of type {qtype}")
    if imatrix is None and h.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"type {qtype} needs an importance matrix")
    im = None
    if imatrix is not None:
        im = np.ascontiguousarray(imatrix, dtype=np.float32)
        if im.shape != (n_per_row,):
            raise ValueError(f"importance matrix has {im.size} values for rows of {n_per_row}")
    rsize = row_size(qtype, n_per_row)
    out = np.empty((n_rows, rsize), dtype=np.uint8)
    src, dst = x.ctypes.data, out.ctypes.data
    imp = im.ctypes.data if im is not None else None

    def work(r0: int, r1: int) -> int:
        return int(h.ggml_quantize_chunk(int(qtype), src, dst, r0 * n_per_row, r1 - r0, n_per_row, imp))

    threads = max(1, min(threads, n_rows))
    if threads == 1:
        work(0, n_rows)
    else:
        from concurrent.futures import ThreadPoolExecutor

        bounds = np.linspace(0, n_rows, threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, bounds[:-1], bounds[1:]))
    return out


def dequantize(data: np.ndarray, qtype: int, n_values: int) -> np.ndarray:
    """ggml's own dequantization of `n_values` values stored as `qtype` (for measuring quantization error)."""
    traits = lib().ggml_get_type_traits(int(qtype)).contents
    if not traits.to_float:
        raise ValueError(f"ggml has no dequantizer for type {qtype}")
    src = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    out = np.empty(n_values, dtype=np.float32)
    traits.to_float(src.ctypes.data, out.ctypes.data, n_values)
    return out


# gguf_type → numpy dtype for numeric scalars and arrays
_GGUF_NP = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
            7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: int  # ggml_type, same numbering as gguf.GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order (innermost first)
    offset: int  # absolute offset in the file
    size: int


@dataclass
class GGUFInfo:
    """A GGUF file's metadata and tensor infos, as ggml parses them."""

    kv: dict[str, Any]
    tensors: list[TensorInfo]

    def get(self, key: str, default: Any = None) -> Any:
        return self.kv.get(key, default)


def read_gguf_info(path: Path | str, keys: set[str] | None = None) -> GGUFInfo:
    """Parse with ggml's own reader. `keys` limits which values are copied out (all by default)."""
    h = lib()
    ctx = h.gguf_init_from_file(os.fsencode(path), _GgufInitParams(True, None))
    if not ctx:
        raise GgmlLibraryError(f"{path}: ggml cannot parse this GGUF file")
    try:
        kv: dict[str, Any] = {}
        for k in range(h.gguf_get_n_kv(ctx)):
            key = h.gguf_get_key(ctx, k).decode()
            if keys is not None and key not in keys:
                continue
            t = h.gguf_get_kv_type(ctx, k)
            if t == _STRING:
                kv[key] = h.gguf_get_val_str(ctx, k).decode("utf-8", "replace")
            elif t == _ARRAY:
                at, n = h.gguf_get_arr_type(ctx, k), h.gguf_get_arr_n(ctx, k)
                if at == _STRING:
                    kv[key] = [h.gguf_get_arr_str(ctx, k, j).decode("utf-8", "replace") for j in range(n)]
                else:
                    dt = np.dtype(_GGUF_NP[at])
                    buf = ctypes.string_at(h.gguf_get_arr_data(ctx, k), n * dt.itemsize)
                    kv[key] = np.frombuffer(buf, dtype=dt).copy()
            else:
                dt = np.dtype(_GGUF_NP[t])
                kv[key] = np.frombuffer(ctypes.string_at(h.gguf_get_val_data(ctx, k), dt.itemsize), dtype=dt)[0].item()
        base = h.gguf_get_data_offset(ctx)
        tensors = []
        for j in range(h.gguf_get_n_tensors(ctx)):
            ne_ptr = h.gguf_get_tensor_ne(ctx, j)
            ne = [ne_ptr[d] for d in range(4)]
            while len(ne) > 1 and ne[-1] == 1:
                ne.pop()
            tensors.append(TensorInfo(h.gguf_get_tensor_name(ctx, j).decode(), h.gguf_get_tensor_type(ctx, j),
                                      tuple(ne), base + h.gguf_get_tensor_offset(ctx, j),
                                      h.gguf_get_tensor_size(ctx, j)))
        return GGUFInfo(kv, tensors)
    finally:
        h.gguf_free(ctx)
