"""Writing a GGUF file one tensor (and one row chunk) at a time.

gguf-py's writer keeps every tensor until the end; we let it write the header, key-values and tensor
infos, then stream the data ourselves so memory stays bounded by a chunk, and hash what we write as we go.

Where the data lands matters: llama.cpp maps the file and reads tensors in place, so a tensor's file offset
is its address within a page. At GGUF's default 32-byte alignment the data section started wherever the
header happened to end (32 bytes off a cache line for the 4B text model), and on an Intel Xeon with
AVX-512 every 64-byte load then split: decode ran 17 % slower than on llama.cpp's own file (issue 17).
"""

from __future__ import annotations

import hashlib
import os
import queue
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from medgemma_cli.converters.checkpoint import Checkpoint
from medgemma_cli.converters.safetensors_io import to_float32
from medgemma_cli.kernels.encode import encode
from medgemma_cli.kernels.ggml import GGUFInfo, dequantize
from medgemma_cli.kernels.policy import nbytes
from medgemma_cli.progress import NullProgress, Progress

CHUNK_ELEMENTS = 8 * 1024 * 1024  # float32 work buffer of 32 MB per chunk
TENSOR_ALIGNMENT = 64  # every tensor's file offset: a cache line (and a whole AVX-512 load)
DATA_START_ALIGNMENT = 4096  # the data section starts on a page (costs at most a page of header padding)
PADDING_KEY = "medgemma_cli.header_padding"  # zero bytes that end the header where the data section should start
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


def _prepared_chunks(ckpt: Checkpoint,
                     tensors: list[PlannedTensor]) -> Iterator[tuple[PlannedTensor, np.ndarray, bool]]:
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
        except BaseException as e:  # noqa: BLE001 (handed to the consumer, raised there)
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


def file_alignment(sizes: Sequence[int]) -> int:
    """The `general.alignment` for tensors of these byte sizes (in file order): GGUF's default 32 (written as
    no key) when 32-byte padding already keeps every tensor on TENSOR_ALIGNMENT, else TENSOR_ALIGNMENT.

    The key is avoided where it can be: llama.cpp's quantizer copies it but pads its own output to 32 bytes,
    so `llama-quantize` would turn a file carrying it into a corrupt one. Every MedGemma tensor is a whole
    number of 64-byte lines, so our files never need it."""
    default = gguf.GGUF_DEFAULT_ALIGNMENT
    whole = all(gguf.GGUFWriter.ggml_pad(n, default) % TENSOR_ALIGNMENT == 0 for n in sizes[:-1])
    return default if whole else TENSOR_ALIGNMENT


def misaligned_tensors(info: GGUFInfo) -> list[str]:
    """The tensors whose data does not start on TENSOR_ALIGNMENT in the file (offsets as ggml reads them)."""
    return [t.name for t in info.tensors if t.offset % TENSOR_ALIGNMENT]


def output_file(w: gguf.GGUFWriter) -> BinaryIO:
    """The file a GGUFWriter writes to: open once its header is written (gguf-py types it optional)."""
    assert w.fout is not None, "the GGUF header is not written yet"
    return w.fout[0]


def begin_gguf(path: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None],
               tensors: Sequence[tuple[str, tuple[int, ...], Q, int]]) -> gguf.GGUFWriter:
    """Write the header, key-values and tensor infos of a new GGUF file for `tensors` (name, numpy shape,
    type, byte size), with the data section starting on a page and every tensor on TENSOR_ALIGNMENT.

    Returns the writer, its file positioned at the data section; the caller writes each tensor's bytes, each
    followed by zeros up to `writer.data_alignment` (absolute file offsets, as llama.cpp reads them)."""
    w = gguf.GGUFWriter(path, arch)
    alignment = file_alignment([n for *_, n in tensors])
    if alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
        w.add_custom_alignment(alignment)
    add_metadata(w)
    # the last key-value, one byte long for now: grown below until the header ends where the data should start
    w.add_key_value(PADDING_KEY, [0], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT8)
    for name, shape, qtype, size in tensors:
        w.add_tensor_info(name, shape, np.dtype(np.float32), size, raw_dtype=qtype)
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        f = output_file(w)
        kv_end = f.tell()
        w.write_ti_data_to_file()
        end = f.tell()
        grow = -end % DATA_START_ALIGNMENT
        if grow:
            f.flush()
            with open(path, "rb") as r:
                r.seek(kv_end)
                infos = r.read(end - kv_end)
            f.seek(kv_end - 1 - 8)  # the padding's element count (u64), then its single byte
            f.write(struct.pack("<Q", 1 + grow) + bytes(1 + grow) + infos)
        if f.tell() % DATA_START_ALIGNMENT:
            raise AssertionError(f"{path}: header ends at {f.tell()}, not on a page")
    except BaseException:
        w.close()
        raise
    return w


def write_gguf(path: Path, arch: str, add_metadata: Callable[[gguf.GGUFWriter], None],
               tensors: list[PlannedTensor], ckpt: Checkpoint, progress: Progress | None = None,
               threads: int | None = None) -> tuple[str, dict[str, QuantError]]:
    """Write a complete GGUF file at `path` (which must not exist).

    Returns its SHA-256 and, per tensor, the quantization error (zero where the bytes are a copy)."""
    progress = progress or NullProgress()
    threads = threads or os.cpu_count() or 1
    w = begin_gguf(path, arch, add_metadata, [(t.gguf_name, t.shape, t.qtype, t.nbytes) for t in tensors])
    fout = output_file(w)
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
            view = np.ascontiguousarray(data).data.cast("B")
            put(view)
            written[t.gguf_name] += len(view)
            progress.advance(len(view))
        if current is not None:
            finish(current)
        fout.flush()
    finally:
        w.close()
    return sha.hexdigest(), errors
