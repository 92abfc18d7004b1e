"""Benchmark: convert a 4B-shaped synthetic bf16 MedGemma checkpoint, one pass per preset, and compare the
one-pass Q4_K_M with the two-pass route (our BF16 GGUF, then llama.cpp's `llama_model_quantize`).

Each step runs in its own process and reports its own peak resident memory (VmHWM; ru_maxrss would
include the parent's at fork time). Speed does not depend on the weight values, so random weights of the
real shape are enough.

    python benchmarks/convert_4b.py --work DIR            # needs ~30 GB free in DIR
    python benchmarks/convert_4b.py --work DIR --presets Q4_K_M --two-pass
    python benchmarks/convert_4b.py --smoke       # the tiny shape, --two-pass, in seconds; figures mean nothing
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

import smoke


def _peak_mb() -> int:
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) // 1024


def _child_convert(src: str, out: str, preset: str) -> None:
    from medgemma_cli.conversion import convert

    t0 = time.perf_counter()
    result = convert(src, out, preset=preset, overwrite=True)
    size = sum(f["size"] for f in result.manifest["files"].values())
    classes = result.manifest["quantization"]["classes"]
    print(json.dumps({"step": f"convert {preset}", "wall_s": round(time.perf_counter() - t0, 1),
                      "peak_rss_mb": _peak_mb(), "output_bytes": size,
                      "text_types": result.manifest["files"]["text.gguf"]["tensor_types"],
                      "rel_rms": {k: v["rel_rms"] for k, v in classes.items() if v["rel_rms"]}}))


def _child_llama_quantize(src: str, dst: str, preset: str) -> None:
    from medgemma_cli.kernels.llama_quantize import llama_quantize
    from medgemma_cli.kernels.policy import PRESETS

    t0 = time.perf_counter()
    llama_quantize(Path(src), Path(dst), PRESETS[preset].file_type, threads=os.cpu_count())
    print(json.dumps({"step": f"llama_model_quantize {preset}", "wall_s": round(time.perf_counter() - t0, 1),
                      "peak_rss_mb": _peak_mb(), "output_bytes": Path(dst).stat().st_size}))


def _run(*args: str) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        raise SystemExit(res.returncode)
    line = json.loads(res.stdout.strip().splitlines()[-1])
    print(json.dumps(line), flush=True)
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smoke.add_arguments(ap)
    ap.add_argument("--shape", default="4b")
    ap.add_argument("--presets", nargs="+", default=["BF16", "Q8_0", "Q4_K_M"])
    ap.add_argument("--two-pass", action="store_true",
                    help="also time BF16 + llama_model_quantize for each K-quant preset")
    ap.add_argument("--keep", action="store_true", help="keep the converted outputs")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = smoke.parse(ap, shape="tiny", two_pass=True)
    if args.child:
        kind, *rest = args.child
        (_child_convert if kind == "convert" else _child_llama_quantize)(*rest)
        return
    from medgemma_cli.synthetic import make_checkpoint

    if args.smoke:
        print(json.dumps({"smoke": smoke.NOTE}), flush=True)
    src = args.work / f"synthetic-{args.shape}-bf16"
    if not (src / "model.safetensors.index.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        t0 = time.perf_counter()
        # in shards with an index, as the 4B checkpoint ships (the tiny one is ~8 MB)
        shard_bytes = 5_000_000 if args.shape == "tiny" else 5_000_000_000
        make_checkpoint(src, args.shape, dtype="bfloat16", shard_bytes=shard_bytes)
        print(f"generated {src.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(json.dumps({"machine_cores": os.cpu_count(), "shape": args.shape, "source_bytes": src_bytes}), flush=True)
    for preset in args.presets:
        out = args.work / f"out-{args.shape}-{preset.lower()}"
        one = _run("--work", str(args.work), "--child", "convert", str(src), str(out), preset)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        if args.two_pass and preset not in ("F32", "F16", "BF16", "Q8_0"):
            mid = args.work / f"out-{args.shape}-twopass-bf16"
            a = _run("--work", str(args.work), "--child", "convert", str(src), str(mid), "BF16")
            dst = args.work / f"out-{args.shape}-twopass-{preset.lower()}.gguf"
            b = _run("--work", str(args.work), "--child", "quantize", str(mid / "text.gguf"), str(dst), preset)
            two = a["wall_s"] + b["wall_s"]
            print(json.dumps({"summary": preset, "one_pass_s": one["wall_s"], "two_pass_s": round(two, 1),
                              "ratio": round(one["wall_s"] / two, 2) if two else None,  # 0.0: a smoke run
                              "one_pass_peak_mb": one["peak_rss_mb"],
                              "two_pass_peak_mb": max(a["peak_rss_mb"], b["peak_rss_mb"]),
                              "two_pass_extra_disk_bytes": (mid / "text.gguf").stat().st_size}), flush=True)
            shutil.rmtree(mid, ignore_errors=True)
            dst.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
