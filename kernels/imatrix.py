"""Importance matrices in llama.cpp's formats (GGUF `*.in_sum2`/`*.counts`, and the legacy `.dat`).

Values come out as llama-quantize feeds them to ggml: per-column mean squared activations, one vector per
weight tensor, keyed by GGUF tensor name.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from medgemma_cli.errors import InputError
from medgemma_cli.kernels.ggml import read_gguf_info

_F32 = 0


def read_imatrix(path: Path | str) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "importance matrix not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    entries = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    if not entries:
        raise InputError(path, "the importance matrix has no entries")
    return entries


def _read_gguf(path: Path) -> dict[str, np.ndarray]:
    info = read_gguf_info(path, keys=set())
    by_name = {t.name: t for t in info.tensors}
    out = {}
    with open(path, "rb") as f:
        def load(t) -> np.ndarray:
            if t.type != _F32:
                raise InputError(path, f"{t.name} is not F32")
            f.seek(t.offset)
            return np.frombuffer(f.read(t.size), dtype=np.float32)

        for name, t in by_name.items():
            if not name.endswith(".in_sum2"):
                continue
            base = name[: -len(".in_sum2")]
            counts_t = by_name.get(base + ".counts")
            if counts_t is None:
                raise InputError(path, f"{base} has sums but no counts")
            sums, counts = load(t), np.rint(load(counts_t))
            ne0 = sums.size // counts.size
            rows = sums.reshape(counts.size, ne0)
            values = np.where(counts[:, None] > 0, rows / np.where(counts > 0, counts, 1)[:, None], 1.0)
            out[base] = values.astype(np.float32).reshape(-1)
    return out


def _read_legacy(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise InputError(path, "truncated importance matrix")
        vals = struct.unpack_from(fmt, data, pos)
        pos += size
        return vals

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise InputError(path, "not an importance matrix (neither GGUF nor llama.cpp's legacy format)")
    out = {}
    for _ in range(n_entries):
        (name_len,) = take("<i")
        if not 0 < name_len < 4096:
            raise InputError(path, "corrupt importance matrix entry name")
        name = data[pos: pos + name_len].decode("utf-8", "replace")
        pos += name_len
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise InputError(path, f"truncated importance matrix entry {name!r}")
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        out[name] = sums / ncall if ncall > 0 else sums
    return out
