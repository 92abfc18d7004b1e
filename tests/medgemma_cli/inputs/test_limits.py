"""Small files that declare huge images, frame counts or texts are refused (or read in part) before memory is
spent. Each bomb is read by `collect` in a child process limited to 1 GB of address space beyond the
interpreter, so a regression fails the test rather than the machine."""

from __future__ import annotations

import copy
import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medgemma_cli.errors import InputError
from medgemma_cli.inputs.collect import collect
from medgemma_cli.inputs.limits import _codestream_size


def data(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def _collect_bounded(path: Path, limit_gb: float = 1.5) -> subprocess.CompletedProcess:
    code = ("import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({int(limit_gb * (1 << 30))}, {int(limit_gb * (1 << 30))}))\n"
            "from pathlib import Path\n"
            "from medgemma_cli.errors import InputError\n"
            "from medgemma_cli.inputs.collect import collect\n"
            "try:\n"
            f"    c = collect([Path({str(path)!r})], 896)\n"
            "    print('OK', len(c.images), sum(len(t) for _, t in c.notes))\n"
            "except InputError as e:\n"
            "    print('REFUSED', e)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def _png_header_only(path: Path, width: int, height: int, bit_depth: int = 16) -> None:
    """A valid PNG signature and IHDR declaring a huge image, then a few bytes of data: 1 KB on disk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))


def test_a_png_declaring_a_huge_image_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 40000, 40000)
    r = _collect_bounded(bomb)
    assert r.stdout.startswith("REFUSED"), r.stdout + r.stderr
    assert "bomb.png" in r.stdout and "MEDGEMMA_MAX_IMAGE_PIXELS" in r.stdout


def test_a_huge_jpeg_is_decoded_at_reduced_scale(tmp_path):
    big = tmp_path / "big.jpg"
    Image.linear_gradient("L").resize((12000, 9000)).save(big, quality=50)  # 108 M pixels: over the limit at full size
    r = _collect_bounded(big)
    assert r.stdout.startswith("OK 1"), r.stdout + r.stderr


def test_a_dicom_declaring_two_billion_frames_is_refused(tmp_path):
    ds = pydicom.dcmread(data("CT_small.dcm"))
    ds.NumberOfFrames = 2147483647
    bomb = tmp_path / "frames.dcm"
    ds.save_as(bomb)
    r = _collect_bounded(bomb)
    assert r.stdout.startswith("REFUSED") and "frames.dcm" in r.stdout and "MEDGEMMA_MAX_DECODED_MB" in r.stdout


@pytest.mark.parametrize("frames", [0, -1])
def test_no_frames_is_an_error_not_an_empty_answer(tmp_path, frames):
    ds = pydicom.dcmread(data("CT_small.dcm"))
    ds.NumberOfFrames = frames
    bad = tmp_path / "none.dcm"
    ds.save_as(bad)
    with pytest.raises(InputError, match=r"none\.dcm: NumberOfFrames"):
        collect([bad], 32)


def test_a_codestream_larger_than_its_header_is_refused(tmp_path):
    """JPEG 2000 DICOM whose header says 64² while the codestream says 65535²: the codestream is believed."""
    ds = pydicom.dcmread(data("JPEG2000.dcm"))
    raw = bytearray(ds.PixelData)
    start = raw.find(b"\xff\x4f\xff\x51")
    assert start > 0 and _codestream_size(bytes(raw[start:start + 64])) == (int(ds.Columns), int(ds.Rows))
    struct.pack_into(">II", raw, start + 8, 65535, 65535)
    ds.PixelData = bytes(raw)
    bomb = tmp_path / "j2k.dcm"
    ds.save_as(bomb)
    r = _collect_bounded(bomb)
    assert r.stdout.startswith("REFUSED"), r.stdout + r.stderr
    assert "j2k.dcm" in r.stdout and "65535×65535" in r.stdout


def test_jpeg_codestream_size_is_read():
    ds = pydicom.dcmread(data("SC_rgb_jpeg_dcmtk.dcm"))
    raw = bytes(ds.PixelData)
    start = raw.find(b"\xff\xd8")
    assert _codestream_size(raw[start:start + 4096]) == (int(ds.Columns), int(ds.Rows))


def test_a_huge_note_is_read_in_part(tmp_path):
    note = tmp_path / "long.txt"
    with open(note, "wb") as f:
        f.write(b"cough and fever for three days. " * (50 << 20 >> 5))  # 50 MB
    r = _collect_bounded(note)
    assert r.stdout.startswith("OK 0"), r.stdout + r.stderr
    chars = int(r.stdout.split()[2])
    assert chars < (3 << 20)  # the budget (2 MB) and the notice, not 50 MB
    text = collect([note], None).notes[0][1]
    assert text.endswith("the rest of this note, 50,331,648 bytes, was not read (MEDGEMMA_MAX_NOTE_BYTES)]")


def test_ordinary_images_are_untouched(tmp_path):
    png = tmp_path / "ok.png"
    rgb = np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(png)
    c = collect([png], 32, keep_full=True)
    assert np.array_equal(c.images[0].full, rgb)
    c = collect([data("CT_small.dcm"), copy.copy(data("MR_small.dcm"))], 32)
    assert len(c.images) == 2


def _encapsulated(tmp_path: Path, name: str, image: Image.Image, fmt: str, syntax: str) -> Path:
    from pydicom.encaps import encapsulate

    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {"irreversible": False}))
    ds = pydicom.dcmread(data("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = image.size[1], image.size[0]
    ds.BitsAllocated = ds.BitsStored = 8 if image.mode == "L" else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.Modality = "OT"
    for k in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if k in ds:
            del ds[k]
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / name, enforce_file_format=False)
    return tmp_path / name


@pytest.mark.parametrize("fmt,syntax,mode", [("JPEG", "1.2.840.10008.1.2.4.50", "L"),
                                             ("JPEG2000", "1.2.840.10008.1.2.4.90", "L"),
                                             ("JPEG2000", "1.2.840.10008.1.2.4.90", "I;16")])
def test_a_large_dicom_jpeg_is_decoded_at_reduced_resolution(tmp_path, monkeypatch, fmt, syntax, mode):
    """The codec reads it smaller (libjpeg's scaled DCT, OpenJPEG's resolution levels) instead of a refusal;
    the rendering is what the full decode gives, within the codec's own scaling error."""
    gradient = Image.linear_gradient("L").resize((640, 480))
    image = gradient if mode == "L" else gradient.convert("I").point(lambda v: v * 200).convert("I;16")
    path = _encapsulated(tmp_path, "big.dcm", image, fmt, syntax)
    full = collect([path], 64, keep_full=True).images[0].full
    assert full.shape[:2] == (480, 640)
    from medgemma_cli.inputs import limits

    monkeypatch.setattr(limits, "RENDER_PIXELS", 100_000)  # 640×480 is over: read at 1/2 (320×240)
    small = collect([path], 64, keep_full=True).images[0].full
    assert small.shape[:2] == (240, 320)
    expected = np.asarray(Image.fromarray(full).resize((320, 240), Image.BOX)).astype(int)
    assert np.abs(small.astype(int) - expected).mean() < 3


def test_a_pdf_whose_content_inflates_to_150_mb_is_bounded(tmp_path):
    from medgemma_cli.testing import fuzz as fuzzing

    pdf = fuzzing.pdf_inflate_bomb(150)
    (tmp_path / "bomb.pdf").write_bytes(pdf)
    r = _collect_bounded(tmp_path / "bomb.pdf", limit_gb=1.0)
    assert r.returncode == 0 and "bomb.pdf" in r.stdout, r.stdout + r.stderr[-2000:]
