"""Benchmark: prompt and decode speed of our one-pass GGUF against llama.cpp's own file of the same weights.

One synthetic bf16 checkpoint of a MedGemma text shape; ours is `convert --preset <preset>` (one pass), the
reference is llama.cpp's quantizer run over our BF16 conversion, laid out by gguf-py (see
llama_cpp_reference.py). Both are checked to hold the same tensors, byte for byte, then timed in turns in
one fresh process per setting (prompt with each, then each decoded token with each, so load from other
work on a shared machine hits both alike), with llama.cpp's extra buffer types off (weights read in place
from the mapped file, where the layout shows) and on (repacked copies, where this machine's verdict allows them).

    python benchmarks/decode_vs_llama_cpp.py --work DIR                # 4B shape; ~25 GB of disk in DIR
    python benchmarks/decode_vs_llama_cpp.py --work DIR --layers 12    # 4B widths, fewer layers
    python benchmarks/decode_vs_llama_cpp.py --smoke                   # the tiny shape; figures mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import smoke
from llama_cpp_reference import compare, layout, reference_gguf, same_tensors


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smoke.add_arguments(ap)
    ap.add_argument("--shape", default="4b", choices=["tiny", "4b", "27b"])
    ap.add_argument("--layers", type=int, help="text layers (default: the shape's own)")
    ap.add_argument("--preset", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--extra-buffers", default="off,on", help="off, on, or off,on")
    ap.add_argument("--build-only", action="store_true", help="make the files (cached in --work), time nothing")
    args = smoke.parse(ap, shape="tiny", layers=None, threads=1, prompt_tokens=16, decode_tokens=4, repeats=1)
    if args.smoke:
        print(json.dumps({"smoke": smoke.NOTE}), flush=True)
    from medgemma_cli.conversion import convert
    from medgemma_cli.llama.loader import verdict
    from medgemma_cli.synthetic import make_checkpoint

    name = f"synthetic-{args.shape}" + (f"-{args.layers}l" if args.layers else "") + "-bf16-text"
    src = args.work / name
    if not (src / "config.json").is_file():
        t0 = time.perf_counter()
        make_checkpoint(src, args.shape, architecture="Gemma3ForCausalLM", dtype="bfloat16", layers=args.layers,
                        shard_bytes=5_000_000 if args.shape == "tiny" else 5_000_000_000)
        print(json.dumps({"checkpoint": name, "s": round(time.perf_counter() - t0, 1)}), flush=True)
    outs = {}
    for preset in (args.preset, "BF16"):
        out = args.work / f"{name}-{preset.lower()}"
        if not (out / "manifest.json").is_file():
            t0 = time.perf_counter()
            convert(src, out, preset=preset, overwrite=True)
            print(json.dumps({"converted": out.name, "s": round(time.perf_counter() - t0, 1)}), flush=True)
        outs[preset] = out / "text.gguf"
    ours = outs[args.preset]
    ref = reference_gguf(outs["BF16"], args.preset, args.work / f"{name}-{args.preset.lower()}-llama-cpp.gguf",
                         threads=os.cpu_count())
    same = same_tensors(ours, ref)
    print(json.dumps({"same_tensor_bytes": same, "layouts": [layout(ours), layout(ref)]}), flush=True)
    if not same:
        raise SystemExit("our file and llama.cpp's hold different tensors: the comparison would not be about layout")
    if args.build_only:
        return
    wanted = [{"off": False, "on": True}[x] for x in args.extra_buffers.split(",")]
    extras = [e for e in wanted if not e or verdict().enabled]  # never where the probe found them unsafe
    summary = compare({"ours": ours, "llama.cpp": ref}, "llama.cpp", extras, args.repeats, args.threads,
                      args.prompt_tokens, args.decode_tokens)
    print(json.dumps({"cpu": _cpu(), "cores": os.cpu_count(), "shape": args.shape, "layers": args.layers,
                      "preset": args.preset, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                      "decode_tokens": args.decode_tokens, "repeats": args.repeats, "summary": summary}), flush=True)


if __name__ == "__main__":
    main()
