"""Hostile inputs at scale: the decompression bombs of issue #13 with their peak RSS, then a fuzz campaign
(thousands of seeded mutants, every DICOM file pydicom and pydicom-data ship) with its outcome table.

Each input is read as `ask` and `batch` read it, in a forked child with 1 GB of address space beyond the reader
and a deadline (medgemma_cli/testing/fuzz.py). Peak RSS includes the reader process itself (~70 MB).

    python benchmarks/fuzz_inputs.py                 # bombs, then 300 mutants per kind (~6 min on 2 cores)
    python benchmarks/fuzz_inputs.py --per-kind 1000 --seed 3
    python benchmarks/fuzz_inputs.py --smoke         # small bombs, 1 mutant per kind, 4 shipped files; seconds
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import platform
import shutil
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import smoke

from medgemma_cli.testing import fuzz as fuzzing


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _dicom_bytes(ds) -> bytes:  # ds: a pydicom Dataset
    b = io.BytesIO()
    ds.save_as(b, enforce_file_format=False)
    return b.getvalue()


def bombs(workdir: Path, side: int = 16384, pdf_mb: int = 150,
          note_mbs: tuple[int, ...] = (50, 500)) -> list[tuple[str, list[tuple[str, bytes]] | Path]]:
    """The issue's table: small files that declare huge things. Large ones are written to disk once. The sizes
    are the issue's; a smoke run makes them small."""
    import pydicom
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    out: list[tuple[str, list[tuple[str, bytes]] | Path]] = []
    ds = pydicom.dcmread(fuzzing.testdata_file("JPEG2000.dcm"))
    raw = bytearray(ds.PixelData)
    start = raw.find(b"\xff\x4f\xff\x51")
    struct.pack_into(">II", raw, start + 8, 65535, 65535)
    ds.PixelData = bytes(raw)
    out.append(("JPEG 2000 DICOM, header 64², codestream 65535²", [("j2k.dcm", _dicom_bytes(ds))]))

    img = Image.linear_gradient("L").resize((side, side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=30)
    del img
    ds = pydicom.dcmread(fuzzing.testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.Rows = ds.Columns = side
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.Modality = "OT"
    for k in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if k in ds:
            del ds[k]
    out.append((f"valid {side}² JPEG DICOM", [("big-jpeg.dcm", _dicom_bytes(ds))]))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compressobj(9)
    row = b"\x00" + b"\x80\x00" * side  # filter byte + `side` 16-bit grey pixels
    idat = b"".join(rows.compress(row) for _ in range(side)) + rows.flush()
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0))
           + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    out.append((f"16-bit PNG, {side}², {len(png) >> 10} KB", [("bomb.png", png)]))

    pdf = fuzzing.pdf_inflate_bomb(pdf_mb)
    out.append((f"PDF note, {len(pdf) >> 10} KB, a compressed content stream of ~{pdf_mb} MB", [("bomb.pdf", pdf)]))

    for mb in note_mbs:
        p = workdir / f"note-{mb}mb.txt"
        with open(p, "wb") as f:
            line = b"cough and fever for three days; no chest pain. " * 20 + b"\n"
            for _ in range((mb << 20) // len(line)):
                f.write(line)
        out.append((f"{mb} MB text note", p))

    ds = pydicom.dcmread(fuzzing.testdata_file("CT_small.dcm"))
    ds.NumberOfFrames = 2147483647
    out.append(("DICOM with NumberOfFrames = 2147483647", [("frames.dcm", _dicom_bytes(ds))]))
    return out


SMOKE_BOMBS: dict[str, Any] = {"side": 512, "pdf_mb": 1, "note_mbs": (1, 2)}  # the cheap bombs keep their sizes


def run_bombs(fz: fuzzing.Fuzzer, workdir: Path, sizes: dict[str, Any] | None = None) -> None:
    print("\n## Decompression bombs\n")
    print("| input | outcome | peak RSS | time |")
    print("|---|---|---|---|")
    for label, files in bombs(workdir, **(sizes or {})):
        if isinstance(files, Path):  # too big to pass around as bytes: a case folder made of a link to it
            folder = workdir / f"case-{files.stem}"
            folder.mkdir()
            os.link(files, folder / files.name)
            r = fz.run_folder(folder)
            shutil.rmtree(folder)
            files.unlink()
        else:
            r = fz.run(fuzzing.Case("bomb", 0, files))
        a = r.get("ask", {})
        outcome = ("FAULT: " + ", ".join(r["faults"])) if r["faults"] else (
            "refused: " + a.get("message", "").split(": ", 1)[-1][:90] if a.get("status") == "refused"
            else f"read ({a.get('images', 0)} image(s), {a.get('notes', 0)} note(s))")
        print(f"| {label} | {outcome} | {r['peak_rss_mb']:.0f} MB | {r['seconds']:.1f} s |")


def run_campaign(fz: fuzzing.Fuzzer, per_kind: int, seed: int, shipped: int | None = None) -> None:
    """`shipped`: read only that many of pydicom's own files, evenly spaced (default: all of them)."""
    print(f"\n## Fuzz campaign: {per_kind} mutants per kind, seed {seed}\n")
    print("| kind | cases | read | refused (InputError) | faults | max peak RSS | slowest |")
    print("|---|---|---|---|---|---|---|")
    signatures: collections.Counter[str] = collections.Counter()
    total = collections.Counter()
    groups = [(k, list(fuzzing.cases(k, per_kind, seed))) for k in fuzzing.KINDS]
    files = fuzzing.shipped_dicom_files()
    if shipped is not None:
        files = files[::max(1, -(-len(files) // shipped))][:shipped]
    groups.append(("pydicom's own files", [fuzzing.Case("file", 0, [(p.name, p.read_bytes())]) for p in files]))
    for kind, cases in groups:
        c = collections.Counter()
        peak = slowest = 0.0
        for case in cases:
            r = fz.run(case)
            c["cases"] += 1
            if r["faults"]:
                c["faults"] += 1
                signatures.update(r["faults"])
            elif r.get("ask", {}).get("status") == "ok":
                c["read"] += 1
            else:
                c["refused"] += 1
            peak, slowest = max(peak, r["peak_rss_mb"]), max(slowest, r["seconds"])
        total.update(c)
        print(f"| {kind} | {c['cases']} | {c['read']} | {c['refused']} | {c['faults']} | {peak:.0f} MB | "
              f"{slowest:.1f} s |")
    print(f"| **all** | {total['cases']} | {total['read']} | {total['refused']} | {total['faults']} | | |")
    if signatures:
        print("\nFault signatures:")
        for sig, n in signatures.most_common():
            print(f"- {n} × {sig}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-kind", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-bombs", action="store_true")
    ap.add_argument("--shipped-files", type=int, help="read only this many of pydicom's own files (default: all)")
    smoke.add_arguments(ap, work=False)
    args = smoke.parse(ap, per_kind=1, shipped_files=4)
    print(f"# Hostile inputs — {_cpu()}, {os.cpu_count()} cores")
    if args.smoke:
        print(f"\n> {smoke.NOTE}. Bomb sizes: {SMOKE_BOMBS}")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, fuzzing.Fuzzer(Path(tmp) / "cases") as fz:
        if not args.no_bombs:
            run_bombs(fz, Path(tmp), SMOKE_BOMBS if args.smoke else None)
        run_campaign(fz, args.per_kind, args.seed, args.shipped_files)
    print(f"\n{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
