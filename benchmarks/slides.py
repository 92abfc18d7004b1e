"""Benchmark: whole slides (#21): patches/s rendered from the 10× level, and peak RSS on a large slide.

    python benchmarks/slides.py --work DIR            # a 100,000 × 80,000 px DICOM WSI (and smaller ones)
    python benchmarks/slides.py --smoke               # tiny sizes, seconds: checks the script runs

Slides are drawn by medgemma_cli.testing.slides (tissue boxes on white glass, 0.25 µm/px at level 0, levels
÷1, ÷4, ÷16, ÷64; 10× is level 1). Each measurement runs in a fresh process so its peak RSS (ru_maxrss) is its
own; the RSS after imports is given beside it, so the difference is what the slide cost.

- large: DICOM WSI, JPEG, TILED_FULL, 100,000 × 80,000 px at level 0 (25,000 × 20,000 at 10×). Tissue tiles are
  flat-coloured (one JPEG reused, so the file is written in a minute): their decode is cheaper than real tissue.
- textured: DICOM WSI (JPEG) and pyramidal TIFF (zlib, through OpenSlide), 40,000 × 32,000 px, every tissue
  tile distinct: the patches/s to quote.

Printed as JSON lines: the reader, the slide, the level, the tissue patches found, the patches rendered, the
time of the mask (the tissue search) and of the patches, patches/s, peak RSS, RSS after imports. Streaming: the
patches are rendered and dropped (what the reader costs); `collect` then holds what the prompt holds (125 × 896²
× 3 bytes = 301 MB of patches).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _measure(kind: str, path: str, mode: str, max_patches: int) -> dict:
    """In this (fresh) process: open, plan, render; timings and peak RSS."""
    import resource

    from medgemma_cli.inputs import dicom, slides
    from medgemma_cli.inputs.collect import collect

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if mode == "collect":
        c = collect([Path(path)], 896, max_patches=max_patches)
        t1 = time.perf_counter()
        plan = c.slides[0].plan
        return {"mode": mode, "patches": len(c.images), "tissue": len(plan.cells), "total_s": round(t1 - t0, 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "rss_after_imports_mb": round(base)}
    if kind == "dicom":
        files = sorted(p for p in Path(path).glob("*.dcm"))
        reader: slides.SlideReader = slides.DicomSlideReader([(f, dicom.read(f, pixels=False)) for f in files])
    else:
        reader = slides.OpenSlideReader(Path(path))
    t_open = time.perf_counter()
    p = slides.plan(reader, "10x", max_patches)
    t_plan = time.perf_counter()
    n = sum(1 for _ in slides.patches(reader, p))
    t_patches = time.perf_counter()
    reader.close()
    lv = reader.levels[p.level]
    return {"mode": mode, "level": p.level, "level_size": f"{lv.width}×{lv.height}", "tissue": len(p.cells),
            "patches": n, "open_s": round(t_open - t0, 2), "mask_s": round(t_plan - t_open, 2),
            "patches_s": round(t_patches - t_plan, 2), "patches_per_s": round(n / (t_patches - t_plan), 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_after_imports_mb": round(base)}


def _fresh(kind: str, path: Path, mode: str, max_patches: int) -> dict:
    here = str(Path(__file__).parent)
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import slides as b; "
            f"print(json.dumps(b._measure({kind!r}, {str(path)!r}, {mode!r}, {max_patches})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def _boxes(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Three tissue pieces, ~20 % of the slide."""
    return [(width // 10, height // 8, width * 4 // 10, height * 3 // 8),
            (width // 2, height // 3, width * 7 // 10, height * 2 // 3),
            (width // 5, height * 6 // 10, width * 9 // 20, height * 9 // 10)]


def main() -> None:
    import smoke

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smoke.add_arguments(ap)
    ap.add_argument("--max-patches", type=int, default=125)
    args = smoke.parse(ap)
    from medgemma_cli.machine import cpu_model, physical_cores
    from medgemma_cli.testing.slides import write_dicom_wsi, write_pyramidal_tiff

    if args.smoke:
        print(json.dumps({"smoke": smoke.NOTE}), flush=True)
    print(json.dumps({"cpu": cpu_model(), "cores": physical_cores()}), flush=True)
    large = (16_000, 12_800) if args.smoke else (100_000, 80_000)
    textured = (16_000, 12_800) if args.smoke else (40_000, 32_000)
    levels = (1, 4, 16, 64)
    cases = []
    folder = args.work / f"large-{large[0]}"
    if not (folder / "level-0.dcm").exists():
        t = time.perf_counter()
        write_dicom_wsi(folder, *large, _boxes(*large), downsamples=levels, jpeg=True, texture=False, label=False)
        print(json.dumps({"wrote": "large DICOM WSI", "seconds": round(time.perf_counter() - t)}), flush=True)
    cases.append(("dicom", folder, f"large DICOM WSI {large[0]}×{large[1]} (flat tiles)"))
    folder = args.work / f"textured-{textured[0]}"
    if not (folder / "level-0.dcm").exists():
        write_dicom_wsi(folder, *textured, _boxes(*textured), downsamples=levels, jpeg=True, label=False)
    cases.append(("dicom", folder, f"textured DICOM WSI {textured[0]}×{textured[1]}"))
    tiff = args.work / f"textured-{textured[0]}.tif"
    if not tiff.exists():
        write_pyramidal_tiff(tiff, *textured, _boxes(*textured), downsamples=levels)
    cases.append(("openslide", tiff, f"textured pyramidal TIFF {textured[0]}×{textured[1]} (OpenSlide)"))
    for kind, path, name in cases:
        size = sum(f.stat().st_size for f in Path(path).glob("*.dcm")) if kind == "dicom" else path.stat().st_size
        for mode in ("stream", "collect"):
            print(json.dumps({"slide": name, "reader": kind, "disk_mb": round(size / 1e6),
                              **_fresh(kind, path, mode, args.max_patches)}, ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
