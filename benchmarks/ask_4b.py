"""Benchmark: `ask` on the 4B-shaped synthetic model (Q4_K_M text, mmproj F16 and Q8_0), 2 threads.

Reports image encode time, time to first token and decode tokens/s through our runtime, decode tokens/s of a
bare llama-cpp-python generation loop on the same GGUF and on llama.cpp's own file of the same weights (its
quantizer over our BF16 conversion, see llama_cpp_reference.py: comparing our file only with itself would
hide a slow file), and the memory-bandwidth bound.

    python benchmarks/ask_4b.py --work DIR     # reuses DIR/synthetic-4b-bf16 from convert_4b.py
    python benchmarks/ask_4b.py --smoke        # the tiny shape in seconds; its figures mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import smoke


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smoke.add_arguments(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved bare-loop runs per file")
    args = smoke.parse(ap, threads=1, decode_tokens=8, repeats=1)
    shape = "tiny" if args.smoke else "4b"
    from PIL import Image

    from medgemma_cli.answering import AskOptions, ask
    from medgemma_cli.bench import memory_bandwidth
    from medgemma_cli.conversion import convert
    from medgemma_cli.inputs.collect import collect
    from medgemma_cli.llama.engine import Engine, Timings
    from medgemma_cli.llama.model_files import resolve_model
    from medgemma_cli.prompt import build_messages
    from medgemma_cli.synthetic import make_checkpoint

    src = args.work / f"synthetic-{shape}-bf16"
    if not (src / "config.json").is_file():  # two shards, as the 4B checkpoint ships
        make_checkpoint(src, shape, dtype="bfloat16", shard_bytes=5_000_000 if args.smoke else 5_000_000_000)
    img = args.work / "chest-1024x880.png"
    yy, xx = np.mgrid[0:880, 0:1024]
    Image.fromarray(np.stack([(xx // 4) % 256, (yy // 4) % 256, ((xx + yy) // 8) % 256], -1).astype(np.uint8)).save(img)
    if args.smoke:
        print(json.dumps({"smoke": smoke.NOTE, "shape": shape}), flush=True)
    print(json.dumps({"machine_cores": os.cpu_count(), "threads": args.threads}), flush=True)
    for mm in ("F16", "Q8_0"):
        out = args.work / f"ask-{shape}-q4_k_m-mmproj-{mm.lower()}"
        if not (out / "manifest.json").is_file():
            t0 = time.perf_counter()
            convert(src, out, preset="Q4_K_M", mmproj_type=mm, overwrite=True)
            print(json.dumps({"converted": out.name, "s": round(time.perf_counter() - t0, 1)}), flush=True)
        r = ask("Describe the findings.", [img], model=out,
                options=AskOptions(max_tokens=args.decode_tokens, threads=args.threads))
        print(json.dumps({"mmproj": mm, "ask_timings": r.timings, "tokens": r.tokens, "stopped": r.stopped}),
              flush=True)

    model = args.work / f"ask-{shape}-q4_k_m-mmproj-f16"
    files = resolve_model(model)
    # our runtime, decode only, a fixed number of tokens (random weights may say <end_of_turn> early)
    engine = Engine(files, n_ctx=1024, threads=args.threads)
    inputs = collect([], None)
    chunks = engine.chunks(engine.render(build_messages("Describe the findings of a chest X-ray.", inputs)), [])
    t = Timings()
    engine.prefill(chunks, t)
    n = engine.generate(args.decode_tokens, timings=t, stop_at_eos=False).tokens
    ours = n / t.decode_s
    prompt = [tok for _, p in chunks.parts for tok in p]
    engine.close()
    # a bare llama-cpp-python loop on the same GGUF, and on llama.cpp's own file of the same weights
    from llama_cpp_reference import layout, reference_gguf, same_tensors

    from medgemma_cli.llama.loader import load_llama

    bf16 = args.work / f"ask-{shape}-bf16"
    if not (bf16 / "manifest.json").is_file():
        convert(src, bf16, preset="BF16", vision_onnx="none", overwrite=True)
    ref = reference_gguf(bf16 / "text.gguf", "Q4_K_M", args.work / f"ask-{shape}-q4_k_m-llama-cpp.gguf",
                         threads=os.cpu_count())
    print(json.dumps({"same_tensor_bytes": same_tensors(files.text, ref),
                      "layouts": [layout(files.text), layout(ref)]}), flush=True)

    def bare_decode(path: Path) -> float:
        llm = load_llama(path, n_ctx=1024, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
        gen = llm.generate(prompt, temp=0.0, top_k=1)
        next(gen)  # the first token comes with the prompt evaluation
        t0 = time.perf_counter()
        for _ in range(args.decode_tokens - 1):
            next(gen)
        rate = (args.decode_tokens - 1) / (time.perf_counter() - t0)
        llm.close()
        return rate

    runs: dict[str, list[float]] = {"ours": [], "llama.cpp": []}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits both alike
        runs["ours"].append(bare_decode(files.text))
        runs["llama.cpp"].append(bare_decode(ref))
    bare, bare_ref = statistics.median(runs["ours"]), statistics.median(runs["llama.cpp"])
    from medgemma_cli.kernels.ggml import read_gguf_info

    weights = sum(t.size for t in read_gguf_info(files.text, keys=set()).tensors)
    bw = memory_bandwidth(args.threads, size_mb=64 if args.smoke else 1024)
    print(json.dumps({"decode_tokens_per_s_ours": round(ours, 2), "decode_tokens_per_s_bare_llama_cpp": round(bare, 2),
                      "decode_tokens_per_s_bare_on_llama_cpp_file": round(bare_ref, 2), "bare_runs": runs,
                      "ours_vs_bare": round(ours / bare, 3),
                      "ours_vs_bare_on_llama_cpp_file": round(ours / bare_ref, 3),
                      "our_file_vs_llama_cpp_file": round(bare / bare_ref, 3), "bandwidth_gbps": round(bw, 1),
                      "bandwidth_bound_tokens_per_s": round(bw * 1e9 / weights, 2),
                      "ours_vs_bound": round(ours / (bw * 1e9 / weights), 3)}), flush=True)


if __name__ == "__main__":
    main()
