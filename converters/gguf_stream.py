"""Writing a GGUF file one tensor (and one row chunk) at a time.

gguf-py's writer keeps every tensor until the end; we let it write the header, key-values and tensor
infos, then stream the data ourselves so memory stays bounded by a chunk, and hash what we write as we go.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from medgemma_cli.converters.checkpoint import Checkpoint
from medgemma_cli.converters.safetensors_io import to_float32
from medgemma_cli.kernels.encode import encode
from medgemma_cli.kernels.ggml import dequantize
from medgemma_cli.kernels.policy import nbytes
from medgemma_cli.progress import NullProgress, Progress

CHUNK_ELEMENTS = 8 * 1024 * 1024  # float32 work buffer of 32 MB per chunk
_SAME_DTYPE = {("BF16", Q.BF16), ("F32", Q.F32), ("F16", Q.F16)}


@dataclass(frozen=True)
class PlannedTensor:
    gguf_name: str
    source: str  # checkpoint key
    shape: tuple[int, ...]  # numpy order, as in the checkpoint
    qtype: Q
    plus_one: bool = False
    imatrix: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return nbytes(self.qtype, self.shape)


def _chunks(t: PlannedTensor) -> list[slice]:
    rows = t.shape[0] if len(t.shape) > 1 else 1
    per_row = int(np.prod(t.shape[1:], dtype=np.int64)) if len(t.shape) > 1 else t.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    return [slice(s, min(s + step, rows)) for s in range(0, rows, step)]


@dataclass
class QuantError:
    """Sums of squares over a tensor: of the source values, and of dequantized minus source."""

    ref: float = 0.0
    err: float = 0.0

    @property
    def rel_rms(self) -> float:
        return float(np.sqrt(self.err / self.ref)) if self.ref > 0 else 0.0


REPORT_STRIDE = 16  # the quantization report measures every 16th row: rows quantize independently


def _prepared_chunks(ckpt: Checkpoint, tensors: list[PlannedTensor]) -> Iterator[tuple[PlannedTensor, np.ndarray, bool]]:
    """(tensor, data, is_final_bytes) per row chunk: a plain copy of the stored bytes when the type does not
    change, else float32 rows ready for encoding. Runs one chunk ahead of the encoder, in a helper thread."""
    for t in tensors:
        dtype = ckpt.entries[t.source].dtype
        copy = (dtype, t.qtype) in _SAME_DTYPE and not t.plus_one
        for rows in _chunks(t):
            raw = ckpt.read_rows(t.source, rows if len(t.shape) > 1 else None)
            if copy:
                yield t, raw, True
                continue
            x = to_float32(raw, dtype)
            if t.plus_one:
                x = x + np.float32(1.0)
            yield t, x.reshape(-1, t.shape[-1]), False


def _read_ahead(items: Iterator, depth: int = 1) -> Iterator:
    """Iterate `items` in a helper thread, `depth` items ahead (numpy and file reads release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def run() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    worker = threading.Thread(target=run, name="medgemma-read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


def _encoded(prepared: Iterator[tuple[PlannedTensor, np.ndarray, bool]], threads: int
             ) -> Iterator[tuple[PlannedTensor, np.ndarray, np.ndarray | None]]:
    """(tensor, output bytes, float32 source rows or None for copies): the encoding stage of the pipeline."""
    for t, data, final in prepared:
        if final:
            yield t, data, None
        else:
            yield t, encode(data, t.qtype, threads, t.imatrix), data


def _measure(x: np.ndarray, out: np.ndarray, qtype: Q, stats: QuantError) -> None:
    xs = x[::REPORT_STRIDE]
    back = dequantize(np.ascontiguousarray(out[::REPORT_STRIDE]), int(qtype), xs.size).reshape(xs.shape)
    flat = xs.reshape(-1)
    d = (back - xs).reshape(-1)
    stats.ref += float(np.dot(flat, flat))
    stats.err += float(np.dot(d, d))


def write_gguf(path: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None],
               tensors: list[PlannedTensor], ckpt: Checkpoint, progress: Progress | None = None,
               threads: int | None = None) -> tuple[str, dict[str, QuantError]]:
    """Write a complete GGUF file at `path` (which must not exist).

    Returns its SHA-256 and, per tensor, the quantization error (zero where the bytes are a copy)."""
    progress = progress or NullProgress()
    threads = threads or os.cpu_count() or 1
    w = gguf.GGUFWriter(path, arch)
    add_metadata(w)
    for t in tensors:
        w.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    sha = hashlib.sha256()
    try:
        fout.flush()
        with open(path, "rb") as head:
            sha.update(head.read())

        def put(data: bytes | memoryview) -> None:
            fout.write(data)
            sha.update(data)

        def pad_to_alignment() -> None:
            pad = -fout.tell() % w.data_alignment
            if pad:
                put(b"\0" * pad)

        pad_to_alignment()
        errors = {t.gguf_name: QuantError() for t in tensors}
        written = {t.gguf_name: 0 for t in tensors}

        def finish(t: PlannedTensor) -> None:
            if written[t.gguf_name] != t.nbytes:
                raise AssertionError(f"{t.gguf_name}: wrote {written[t.gguf_name]} bytes, planned {t.nbytes}")
            pad_to_alignment()
            progress.advance(0, tensors=1)

        current: PlannedTensor | None = None
        # three stages in three threads: read + widen, quantize (itself on `threads` cores), hash + write
        stages = _read_ahead(_encoded(_read_ahead(_prepared_chunks(ckpt, tensors)), threads))
        for t, data, x in stages:
            if current is not None and t is not current:
                finish(current)
            current = t
            if x is not None and t.qtype != Q.F32:
                _measure(x, data, t.qtype, errors[t.gguf_name])
            view = memoryview(np.ascontiguousarray(data)).cast("B")
            put(view)
            written[t.gguf_name] += len(view)
            progress.advance(len(view))
        if current is not None:
            finish(current)
        fout.flush()
    finally:
        w.close()
    return sha.hexdigest(), errors
