"""Benchmark: convert a 4B-shaped synthetic bf16 MedGemma checkpoint to BF16, Q8_0 and Q4_K_M.

Reports wall time and peak resident memory of each conversion (each in its own process, so peaks do
not mix). Speed does not depend on the weight values, so random weights of the real shape are enough.

    python benchmarks/convert_4b.py --work /path/with/40GB/free [--shape 4b] [--presets BF16 Q8_0 Q4_K_M]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def child(src: str, out: str, preset: str) -> None:
    from medgemma_cli.conversion import convert

    t0 = time.perf_counter()
    result = convert(src, out, preset=preset, overwrite=True)
    wall = time.perf_counter() - t0
    # VmHWM is this process's own high-water mark; ru_maxrss would include the parent's at fork time
    rss_kb = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0])
    size = sum(f["size"] for f in result.manifest["files"].values())
    print(json.dumps({"preset": preset, "wall_s": round(wall, 1), "peak_rss_mb": round(rss_kb / 1024),
                      "output_bytes": size, "types": {k: v["tensor_types"] for k, v in result.manifest["files"].items()}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (needs ~40 GB for 4b)")
    ap.add_argument("--shape", default="4b")
    ap.add_argument("--presets", nargs="+", default=["BF16", "Q8_0", "Q4_K_M"])
    ap.add_argument("--keep", action="store_true", help="keep the converted outputs")
    ap.add_argument("--child", nargs=3, metavar=("SRC", "OUT", "PRESET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    from medgemma_cli.synthetic import make_checkpoint

    src = args.work / f"synthetic-{args.shape}-bf16"
    if not (src / "model.safetensors.index.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        t0 = time.perf_counter()
        make_checkpoint(src, args.shape, dtype="bfloat16", shard_bytes=5_000_000_000)
        print(f"generated {src.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(json.dumps({"machine_cores": os.cpu_count(), "shape": args.shape, "source_bytes": src_bytes}))
    for preset in args.presets:
        out = args.work / f"out-{args.shape}-{preset.lower()}"
        res = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--child", str(src), str(out), preset],
                             capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            raise SystemExit(res.returncode)
        print(res.stdout.strip().splitlines()[-1], flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
