"""Lazy safetensors reading and writing with numpy alone.

We parse the format ourselves (8-byte header length, JSON header, raw little-endian data) so that
bf16 checkpoints need neither torch nor ml_dtypes, tensors are memory-mapped rather than loaded, and a
truncated or corrupt file is reported by name before any output is written.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medgemma_cli.errors import InputError

# safetensors dtype -> (numpy storage dtype, bytes per element). bf16 is stored as uint16 bits.
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and byte range inside the data section."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Read and validate one file's header; the tensor data is not touched."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise InputError(path, "not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise InputError(path, "corrupt or truncated safetensors file (header length out of range)")
            header_bytes = f.read(header_len)
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, "corrupt safetensors header (not valid JSON)") from e
    if not isinstance(header, dict):
        raise InputError(path, "corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    if not all(isinstance(info, dict) for name, info in header.items() if name != "__metadata__"):
        raise InputError(path, "corrupt safetensors header (an entry is not an object)")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(path, f"corrupt safetensors header entry for tensor {name!r}") from e
        if dtype not in _DTYPES:
            raise InputError(path, f"tensor {name!r} has unsupported dtype {dtype}")
        expected = _DTYPES[dtype].itemsize * (int(np.prod(shape, dtype=np.int64)) if shape else 1)
        if end - begin != expected or begin < 0:
            raise InputError(path, f"tensor {name!r}: byte range does not match its shape {list(shape)} ({dtype})")
        if data_start + end > size:
            raise InputError(
                path, f"truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes"
            )
        entries[name] = TensorEntry(path, name, dtype, shape, data_start + begin, data_start + end)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values() if e.end > e.begin)
    for (_, end_a, a), (begin_b, _, b) in itertools.pairwise(spans):
        if begin_b < end_a:  # two tensors reading the same bytes: a crafted or broken header
            raise InputError(path, f"corrupt safetensors header: tensors {a!r} and {b!r} overlap")
    return entries


class SafetensorsFile:
    """One safetensors file, read on demand with positioned reads.

    We read rather than memory-map so that the pages of a multi-GB checkpoint never count towards our
    resident memory: peak memory stays at a few row chunks whatever the model size.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries = read_header(self.path)
        self._fd: int | None = None

    def _read(self, offset: int, out: np.ndarray) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        view = out.reshape(-1).view(np.uint8).data
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done) if hasattr(os, "preadv") else _pread_into(
                self._fd, view[done:], offset + done)
            if n <= 0:
                raise InputError(self.path, "truncated while reading tensor data")
            done += n
        return out

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """A tensor (or a range of its first-axis rows) in its stored dtype; bf16 comes back as uint16 bits."""
        e = self.entries[name]
        dt = _DTYPES[e.dtype]
        shape = e.shape
        if rows is None or not shape:
            return self._read(e.begin, np.empty(shape, dtype=dt))
        start, stop, _ = rows.indices(shape[0])
        row_bytes = dt.itemsize * (int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1)
        return self._read(e.begin + start * row_bytes, np.empty((stop - start, *shape[1:]), dtype=dt))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Widen stored values to float32 (exact for bf16 and f16)."""
    if dtype == "BF16":
        out = np.empty(raw.shape, dtype=np.uint32)
        np.left_shift(raw, 16, out=out, dtype=np.uint32)  # one pass, no temporary
        return out.view(np.float32)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"not a floating-point tensor: {dtype}")
    return raw.astype(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), returned as uint16 bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def write_file(path: Path, specs: Iterable[tuple[str, str, tuple[int, ...]]],
               fill: Callable[[str], np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor: the header comes from `specs` (name, dtype, shape),
    the data from `fill(name)`, called once per tensor, so a multi-GB file never sits in memory."""
    specs = list(specs)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in specs:
        nbytes = _DTYPES[dtype].itemsize * (int(np.prod(shape, dtype=np.int64)) if shape else 1)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in specs:
            arr = np.ascontiguousarray(fill(name), dtype=_DTYPES[dtype])
            if arr.shape != tuple(shape):
                raise ValueError(f"{name}: produced shape {arr.shape}, declared {tuple(shape)}")
            arr.tofile(f)


def save(path: Path, tensors: Mapping[str, tuple[str, np.ndarray]]) -> None:
    """Write small in-memory tensors: name -> (safetensors dtype, storage array)."""
    write_file(path, [(n, d, tuple(a.shape)) for n, (d, a) in tensors.items()], lambda n: tensors[n][1])
