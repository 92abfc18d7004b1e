"""Sizes checked before anything is decoded: every image ends up 896² and every note a few thousand tokens, so a
small file that declares a huge image, frame count or text is refused (or read in part) before memory is spent.

Each limit can be raised with an environment variable, named in the error it gives.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medgemma_cli.errors import InputError

if TYPE_CHECKING:
    from pydicom import Dataset

LIMITS = {  # name: (environment variable, default)
    "image_pixels": ("MEDGEMMA_MAX_IMAGE_PIXELS", 64_000_000),  # per image or frame; a 3000×3000 CR is 9 M
    "decoded_mb": ("MEDGEMMA_MAX_DECODED_MB", 1024),  # one DICOM file's decoded pixel data
    "note_bytes": ("MEDGEMMA_MAX_NOTE_BYTES", 2 << 20),  # ~500k tokens: more than any context holds
    "pdf_pages": ("MEDGEMMA_MAX_PDF_PAGES", 100),
}


RENDER_PIXELS = 4096 * 4096  # larger frames are reduced first: the model sees 896², MedSigLIP 448²


def limit(name: str) -> int:
    env, default = LIMITS[name]
    try:
        value = int(os.environ.get(env, default))
    except ValueError:
        value = default
    return value if value > 0 else default


def raise_hint(name: str) -> str:
    return f"{LIMITS[name][0]}=N raises the limit"


def check_image_size(path: Path, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise InputError(path, f"declares a {width}×{height} image")
    if width * height > limit("image_pixels"):
        raise InputError(path, f"a {width}×{height} image is over the limit of {limit('image_pixels'):,} pixels "
                               f"({raise_hint('image_pixels')})")


def check_dicom_pixels(ds: Dataset, path: Path) -> int:
    """The header's frame count and sizes, checked against the limits and against the pixel data actually
    there (and, for JPEG and JPEG 2000, the first frame's own codestream header). Returns the frame count."""
    raw: Any = None
    try:
        raw = ds.get("NumberOfFrames", 1)
        frames = int(raw if raw not in (None, "") else 1)
    except (TypeError, ValueError, OverflowError):
        raise InputError(path, f"NumberOfFrames {raw if raw is not None else ''!r} is not a number") from None
    if frames < 1:
        raise InputError(path, f"NumberOfFrames is {frames}: no image to read")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        stored = int(ds.get("BitsStored", bits) or bits)
    except (AttributeError, TypeError, ValueError):
        raise InputError(path, "Rows, Columns or BitsAllocated missing or not a number") from None
    if bits not in (1, 8, 16, 32, 64) or not 1 <= stored <= bits:
        raise InputError(path, f"BitsAllocated {bits} with BitsStored {stored} is not a pixel format DICOM defines")
    if samples not in (1, 3):
        raise InputError(path, f"SamplesPerPixel {samples}: only grey (1) and colour (3) images exist")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or not syntax.is_transfer_syntax:
        raise InputError(path, f"transfer syntax {str(syntax or 'missing')!r} is not one DICOM defines")
    factor = reduction(ds)
    if factor == 1:
        check_image_size(path, cols, rows)
    rows, cols = -(-rows // factor), -(-cols // factor)  # what will be decoded
    decoded = rows * cols * frames * samples * max(1, (bits + 7) // 8)
    if decoded > limit("decoded_mb") << 20:
        raise InputError(path, f"{frames} frame(s) of {cols}×{rows} would decode to {decoded >> 20:,} MB, over the "
                               f"limit of {limit('decoded_mb'):,} MB ({raise_hint('decoded_mb')})")
    pixel_data = ds.get("PixelData")
    if pixel_data is None:
        return frames
    if not syntax.is_compressed:
        # (half: YBR_FULL_422 stores 2 bytes for 3 samples; anything shorter cannot hold the frames declared)
        if bits >= 8 and len(pixel_data) < decoded // 2:
            raise InputError(path, f"declares {frames} frame(s) of {cols}×{rows} ({decoded:,} bytes) but holds "
                                   f"{len(pixel_data):,} bytes of pixel data")
        return frames
    first = _first_fragment(pixel_data)
    size = _codestream_size(first)
    if size is not None and (size[0] > cols * factor or size[1] > rows * factor):
        raise InputError(path, f"the compressed image says {size[0]}×{size[1]}, the header "
                               f"{int(ds.Columns)}×{int(ds.Rows)}")
    return frames


REDUCIBLE = {  # transfer syntax: the largest power-of-two reduction its decoder offers (through Pillow)
    "1.2.840.10008.1.2.4.50": 8,  # JPEG baseline: libjpeg's DCT scaling (draft mode)
    "1.2.840.10008.1.2.4.51": 8,  # JPEG extended, 8-bit frames only (checked below)
    "1.2.840.10008.1.2.4.90": 32,  # JPEG 2000: resolution levels (5 by default)
    "1.2.840.10008.1.2.4.91": 32,
}


def reduction(ds: Dataset) -> int:
    """1, or the power of two by which a JPEG or JPEG 2000 frame larger than RENDER_PIXELS is decoded by the
    codec itself: the model sees 896², and a 16384² frame read at 1/4 costs 1/16 of the memory and time."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
        unsigned = int(ds.get("PixelRepresentation", 0) or 0) == 0
        eight_bit = int(ds.BitsAllocated) == 8
    except (AttributeError, TypeError, ValueError):
        return 1
    most = REDUCIBLE.get(syntax, 1)
    if most == 1 or rows * cols <= RENDER_PIXELS or not unsigned or (most == 8 and not eight_bit):
        return 1
    factor = 2
    while (rows // factor) * (cols // factor) > RENDER_PIXELS and factor < most:
        factor *= 2
    return factor if (rows // factor) * (cols // factor) <= limit("image_pixels") else 1


def _first_fragment(pixel_data: bytes) -> bytes:
    """The first fragment of encapsulated pixel data (after the basic offset table), without copying the rest."""
    try:
        offset = 0
        for _ in range(2):  # the offset table item, then the first fragment
            tag, length = struct.unpack_from("<II", pixel_data, offset)
            if tag != 0xE000FFFE:
                return b""
            start = offset + 8
            offset = start + length
        return bytes(pixel_data[start:start + min(length, 65536)])
    except struct.error:
        return b""


def _codestream_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG 2000 SIZ marker or a JPEG SOFn marker at the start of a codestream."""
    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 24:  # J2K: SOC, SIZ (Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz)
        xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", data, 8)
        return max(0, xsiz - xo), max(0, ysiz - yo)
    if data[:2] == b"\xff\xd8":  # JPEG: walk the markers to the frame header
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            (length,) = struct.unpack_from(">H", data, i + 2)
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack_from(">HH", data, i + 5)
                return width, height
            i += 2 + length
    return None
