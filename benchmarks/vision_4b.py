"""Benchmark: MedGemma 4B shape, 2 threads — image encode and time to first token with the vision tower on
ONNX Runtime int8 versus libmtmd (mmproj F16 and Q8_0), in one run; and a unit with 5 questions answered
from one encoding versus 5 separate asks.

    python benchmarks/vision_4b.py --work DIR    # reuses DIR/synthetic-4b-bf16 and the ask_4b.py conversions
    python benchmarks/vision_4b.py --smoke       # makes the tiny shape's; in seconds, its figures mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import smoke

QUESTIONS = ["Describe the findings.", "Is there a pleural effusion?", "Is the heart enlarged?",
             "Any sign of pneumothorax?", "What would you recommend next?"]


def _convert_child(src: str, out: str) -> None:
    from medgemma_cli.conversion import convert

    t0 = time.perf_counter()
    convert(src, out, preset="Q4_K_M", vision_onnx="int8", overwrite=True)
    hwm = int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) // 1024
    print(json.dumps({"converted_with_vision_onnx_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": hwm}))


def _smoke_inputs(src: Path, mmproj_q8_0: Path) -> None:
    """What a real run reuses from convert_4b.py and ask_4b.py, made here on the tiny shape."""
    from medgemma_cli.conversion import convert
    from medgemma_cli.synthetic import make_checkpoint

    if not (src / "config.json").is_file():
        make_checkpoint(src, "tiny", dtype="bfloat16", shard_bytes=5_000_000)
    if not (mmproj_q8_0 / "manifest.json").is_file():
        convert(src, mmproj_q8_0, preset="Q4_K_M", mmproj_type="Q8_0", overwrite=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smoke.add_arguments(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = smoke.parse(ap, threads=1)
    if args.child:
        _convert_child(*args.child)
        return
    from medgemma_cli.answering import AskOptions, ask, ask_many

    shape = "tiny" if args.smoke else "4b"
    src = args.work / f"synthetic-{shape}-bf16"
    model = args.work / f"vision-{shape}-q4_k_m-onnx-int8"
    if args.smoke:
        print(json.dumps({"smoke": smoke.NOTE, "shape": shape}), flush=True)
        _smoke_inputs(src, args.work / f"ask-{shape}-q4_k_m-mmproj-q8_0")
    if not (model / "vision.onnx").is_file():
        r = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--child", str(src), str(model)],
                           capture_output=True, text=True)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
            raise SystemExit(1)
        print(r.stdout.strip().splitlines()[-1], flush=True)
    img = args.work / "chest-1024x880.png"
    if not img.is_file():
        import numpy as np
        from PIL import Image

        yy, xx = np.mgrid[0:880, 0:1024]
        pattern = np.stack([(xx // 4) % 256, (yy // 4) % 256, ((xx + yy) // 8) % 256], -1).astype(np.uint8)
        Image.fromarray(pattern).save(img)
    print(json.dumps({"machine_cores": os.cpu_count(), "threads": args.threads}), flush=True)
    runs = [("onnx int8", model, "onnx"), ("mtmd F16", model, "mtmd"),
            ("mtmd Q8_0", args.work / f"ask-{shape}-q4_k_m-mmproj-q8_0", "mtmd")]
    for label, folder, backend in runs:
        if not (folder / "text.gguf").is_file():
            continue
        r = ask("Describe the findings.", [img], model=folder,
                options=AskOptions(max_tokens=8, threads=args.threads, vision_backend=backend))
        print(json.dumps({"vision": label, "image_encode_s": r.timings["image_encode_s"],
                          "first_token_s": r.timings["first_token_s"], "load_s": r.timings["load_s"]}), flush=True)
    opts = AskOptions(max_tokens=16, threads=args.threads, vision_backend="onnx")
    t0 = time.perf_counter()
    ask_many(QUESTIONS, [img], model=model, options=opts)
    together = time.perf_counter() - t0
    t0 = time.perf_counter()
    for q in QUESTIONS:
        ask(q, [img], model=model, options=opts)
    separate = time.perf_counter() - t0
    print(json.dumps({"five_questions_one_encoding_s": round(together, 1), "five_separate_asks_s": round(separate, 1),
                      "ratio": round(together / separate, 2)}), flush=True)


if __name__ == "__main__":
    main()
