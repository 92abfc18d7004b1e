"""Asking twice about the same series, in two processes: what the image-embedding and prompt caches save.

Runs `medgemma ask --json` on one synthetic CT series with a fresh store: the first ask (nothing cached), the
same ask again in a new process (both caches), an ask with another system prompt (embeddings from the cache, the
prompt read again), then asks about series of other pixels with --no-cache (4, 8 and 16 slices by default), to
set the estimate the earlier runs taught this machine against what each run took. One JSON line per run (wall time
of the process, time to the first token as the command measures it, what came from the cache), then the ratios the
issue asks about.

    python benchmarks/cache_reuse.py --model /path/to/converted-4b --slices 8 --estimate-slices 4 8 16 --threads 2
    python benchmarks/cache_reuse.py --smoke        # tiny random model, seconds; the figures mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import smoke


def _series(folder: Path, n: int, shift: int = 0) -> Path:
    import copy

    import pydicom
    from pydicom.data import get_testdata_file

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.77.1"
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.77.1.{i}"
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * i]
        ds.InstanceNumber = i + 1
        ds.PixelData = (ds.pixel_array + 7 * i + shift).astype(ds.pixel_array.dtype).tobytes()  # slices differ
        ds.save_as(folder / f"s{i:03d}.dcm")
    return folder


def _ask(model: Path, series: Path, home: Path, threads: int, max_tokens: int, backend: str, *extra: str) -> dict:
    env = {**os.environ, "MEDGEMMA_HOME": str(home)}
    cmd = [sys.executable, "-m", "medgemma_cli", "ask", "Describe the findings.", str(series), "--model", str(model),
           "--threads", str(threads), "--max-tokens", str(max_tokens), "--vision-backend", backend, "--json", *extra]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"ask failed: {r.stderr.strip()[-2000:]}")
    out = json.loads(r.stdout)
    return {"wall_s": round(wall, 2), "load_s": out["timings"]["load_s"],
            "first_token_s": out["timings"]["first_token_s"], "image_encode_s": out["timings"]["image_encode_s"],
            "cache": out["cache"], "estimate": out["estimate"], "prompt_tokens": out["tokens"]["prompt"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="a converted MedGemma folder (text.gguf + mmproj.gguf)")
    ap.add_argument("--slices", type=int, default=8, help="the series asked about twice")
    ap.add_argument("--estimate-slices", type=int, nargs="+", default=[4, 8, 16],
                    help="series of other pixels whose estimate is checked against the run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--vision-backend", default="auto", choices=["auto", "onnx", "mtmd"])
    smoke.add_arguments(ap, work=False)
    args = smoke.parse(ap, slices=4, estimate_slices=[2, 4], max_tokens=4, threads=1)
    if args.smoke:
        print(json.dumps({"smoke": smoke.NOTE}), flush=True)
    with tempfile.TemporaryDirectory(prefix="cache-reuse-") as scratch:
        work = Path(scratch)
        model = args.model
        if args.smoke:
            from medgemma_cli.conversion import convert
            from medgemma_cli.synthetic import make_checkpoint

            model = convert(make_checkpoint(work / "ckpt", "tiny"), work / "model", preset="Q8_0").path
        if model is None:
            raise SystemExit("give --model (a converted folder) or --smoke")
        series = _series(work / "series", args.slices)
        home = work / "home"
        common = (model, series, home, args.threads, args.max_tokens, args.vision_backend)
        runs = {"first": _ask(*common), "again": _ask(*common),
                "other_prompt": _ask(*common, "--system", "You are an expert radiologist.")}
        for name, run in runs.items():
            print(json.dumps({"run": name, "slices": args.slices, **run}), flush=True)
        errors = {}
        for n in args.estimate_slices:
            # other pixels, nothing cached: the estimate the earlier runs taught against what it takes
            run = _ask(model, _series(work / f"other-{n}", n, shift=3 + n), home, args.threads, args.max_tokens,
                       args.vision_backend, "--no-cache")
            print(json.dumps({"run": "estimated", "slices": n, **run}), flush=True)
            estimate = run["estimate"]
            errors[str(n)] = estimate and {
                "estimate_total_s": estimate["total_s"], "run_first_token_s": run["first_token_s"],
                "error": round(estimate["total_s"] / max(run["first_token_s"], 1e-9) - 1, 3)}
        first, again = runs["first"], runs["again"]
        print(json.dumps({
            "smoke": args.smoke, "cpu_count": os.cpu_count(), "threads": args.threads,
            "second_first_token_vs_first": round(again["first_token_s"] / max(first["first_token_s"], 1e-9), 4),
            "second_wall_vs_first": round(again["wall_s"] / max(first["wall_s"], 1e-9), 4),
            "other_prompt_encoded": runs["other_prompt"]["cache"]["images_encoded"],
            "estimate_errors": errors,
        }), flush=True)


if __name__ == "__main__":
    main()
