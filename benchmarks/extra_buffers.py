"""Benchmark: llama.cpp with and without its extra CPU buffer types (AMX tiles, repacked weights).

Prompt and decode tokens/s of 4B-shaped random-weight models, loaded once with the extra buffer types on and
once with them off (interleaved repeats, medians). Runs the "on" side only where this machine's verdict
allows it (never where the probe found a crash).

    python benchmarks/extra_buffers.py --work DIR [--presets Q4_K_M Q8_0] [--repeats 3]
    python benchmarks/extra_buffers.py --smoke      # the tiny shape in seconds; its figures mean nothing
"""

from __future__ import annotations

import argparse
import json
import os

import smoke


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smoke.add_arguments(ap)
    ap.add_argument("--shape", default="4b")
    ap.add_argument("--presets", nargs="+", default=["Q4_K_M", "Q8_0"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = smoke.parse(ap, shape="tiny", threads=1, prompt_tokens=16, decode_tokens=4, repeats=1)
    if args.smoke:
        print(json.dumps({"smoke": smoke.NOTE}), flush=True)
    os.environ.setdefault("MEDGEMMA_HOME", str(args.work / "home"))

    from medgemma_cli.bench import end_to_end, synthetic_gguf
    from medgemma_cli.llama.loader import verdict
    from medgemma_cli.machine import cpu_model, physical_cores

    v = verdict()
    threads = args.threads or physical_cores()
    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads, "verdict": v.as_dict()}),
          flush=True)
    sides = [True, False] if v.enabled else [False]
    for preset in args.presets:
        path = synthetic_gguf(args.shape, preset, args.work)
        runs: dict[bool, list] = {s: [] for s in sides}
        for _ in range(args.repeats):
            for extra in sides:
                runs[extra].append(end_to_end(path, args.shape, preset, threads, args.prompt_tokens,
                                              args.decode_tokens, extra_buffers=extra))
        for extra, rows in runs.items():
            pp = sorted(r.prompt_tokens_per_s for r in rows)
            tg = sorted(r.decode_tokens_per_s for r in rows)
            print(json.dumps({"shape": args.shape, "preset": preset, "extra_buffers": extra,
                              "buffer_types": rows[0].buffer_types,
                              "prompt_tok_s": {"median": pp[len(pp) // 2], "min": pp[0], "max": pp[-1]},
                              "decode_tok_s": {"median": tg[len(tg) // 2], "min": tg[0], "max": tg[-1]}}),
                  flush=True)


if __name__ == "__main__":
    main()
