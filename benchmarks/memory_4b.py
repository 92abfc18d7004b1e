"""Benchmark: peak resident memory (VmHWM) up to the first token on the 4B shape, `ask` against bare
llama-cpp-python + libmtmd doing the same work, one process per configuration, in one run.

Workloads: one image, 8 and 32 images (a series' slices cost the same: 256 image tokens each, plus a label).
Each configuration runs in its own child process, which reports its own VmHWM (ru_maxrss of the parent would
mix configurations). Next to each `ask` figure: the estimate `ask` prints before loading, by component. Also
ONNX Runtime's encoder alone, with and without its memory arena.

    python benchmarks/memory_4b.py --work DIR                # reuses DIR/vision-4b-q4_k_m-onnx-int8 (vision_4b.py)
    python benchmarks/memory_4b.py --work DIR --model FOLDER --images 1 8 32
    python benchmarks/memory_4b.py --smoke                   # the tiny shape, in seconds; its figures mean nothing
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

QUESTION = "Describe the findings."


def _peak_bytes() -> int:
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024


def _images(work: Path, n: int, size: int, same: bool = False) -> list[Path]:
    """`n` pictures of `size` px, or with `same` the first one `n` times."""
    import numpy as np
    from PIL import Image

    out = []
    for i in range(1 if same else n):
        path = work / f"memory-image-{size}-{i:02d}.png"
        if not path.is_file():
            yy, xx = np.mgrid[0:size, 0:size]
            pattern = np.stack([(xx // (4 + i)) % 256, (yy // 4) % 256, ((xx + yy + 7 * i) // 8) % 256], -1)
            Image.fromarray(pattern.astype(np.uint8)).save(path)
        out.append(path)
    return out * n if same else out


def child_ours(model: Path, images: list[Path], threads: int, kv_type: str) -> dict:
    from medgemma_cli.answering import AskOptions, ask

    t0 = time.perf_counter()
    # the cache as `ask` has it by default, in a store of this child's own (run_child): nothing from another run
    r = ask(QUESTION, images, model=model, options=AskOptions(max_tokens=1, threads=threads, kv_type=kv_type,
                                                                memory_check=False))
    return {"peak_bytes": _peak_bytes(), "estimate": r.memory, "prompt_tokens": r.tokens["prompt"],
            "n_ctx": r.model["n_ctx"], "vision_backend": r.model["vision_backend"], "cache": r.cache,
            "first_token_s": round(time.perf_counter() - t0, 1)}


def child_bare(model: Path, images: list[Path], threads: int) -> dict:
    """llama-cpp-python's Llama with its defaults (the file mapped, llama.cpp's extra buffers) and libmtmd's
    own helper, as a program using the two libraries directly would."""
    import ctypes

    import llama_cpp
    import numpy as np
    from llama_cpp import mtmd_cpp as m
    from PIL import Image

    from medgemma_cli.llama.model_files import resolve_model

    files = resolve_model(model)
    size = files.vision["image_size"] if files.vision else 896
    t0 = time.perf_counter()
    n_ctx = -(-(len(images) * 270 + 256) // 256) * 256
    llm = llama_cpp.Llama(str(files.text), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    params = m.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = threads
    mctx = m.mtmd_init_from_file(os.fsencode(files.mmproj), llm._model.model, params)
    marker = m.mtmd_default_marker().decode()
    prompt = ("<start_of_turn>user\n" + "".join(f"\n\n{marker}\n\n" for _ in images) + QUESTION
              + "<end_of_turn>\n<start_of_turn>model\n")
    pixels = [np.ascontiguousarray(np.asarray(Image.open(p).convert("RGB").resize((size, size))), dtype=np.uint8)
              for p in images]
    bitmaps = [m.mtmd_bitmap_init(size, size, px.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))) for px in pixels]
    chunks = m.mtmd_input_chunks_init()
    text = m.mtmd_input_text()
    encoded = prompt.encode()
    text.text, text.text_len, text.add_special, text.parse_special = encoded, len(encoded), True, True
    if m.mtmd_tokenize(mctx, chunks, ctypes.byref(text), (m.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps),
                       len(bitmaps)) != 0:
        raise SystemExit("mtmd_tokenize failed")
    n_past = llama_cpp.llama_pos(0)
    if m.mtmd_helper_eval_chunks(mctx, llm._ctx.ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) != 0:
        raise SystemExit("mtmd_helper_eval_chunks failed")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm._model.model))
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,))
    int(np.argmax(logits))
    return {"peak_bytes": _peak_bytes(), "prompt_tokens": int(n_past.value), "n_ctx": n_ctx,
            "first_token_s": round(time.perf_counter() - t0, 1)}


def child_onnx(model: Path, arena: bool, threads: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    from medgemma_cli.llama.model_files import resolve_model

    files = resolve_model(model)
    size = files.vision["image_size"] if files.vision else 896
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_cpu_mem_arena = arena
    session = ort.InferenceSession(str(files.vision_onnx), opts, providers=["CPUExecutionProvider"])
    loaded = _peak_bytes()
    px = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    t0 = time.perf_counter()
    session.run(None, {"pixel_values": px})
    return {"peak_bytes": _peak_bytes(), "after_load_bytes": loaded, "encode_s": round(time.perf_counter() - t0, 1)}


def child_text(model: Path, mapped: bool, threads: int) -> dict:
    """The text model alone with llama.cpp's extra buffers, its file mapped (llama-cpp-python's default) or read
    (what load_llama does where the weights are repacked), after a 600-token prompt."""
    import llama_cpp

    from medgemma_cli.llama.model_files import resolve_model

    llm = llama_cpp.Llama(str(resolve_model(model).text), n_ctx=1024, n_batch=512, use_mmap=mapped, verbose=False,
                          n_threads=threads, n_threads_batch=threads)
    llm.eval([t % llm.n_vocab() for t in range(1000, 1600)])
    status = Path("/proc/self/status").read_text()
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in status.splitlines()
              if line.startswith(("RssAnon", "RssFile"))}
    return {"peak_bytes": _peak_bytes(), **fields}


def run_child(work: Path, argv: list[str]) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="memory-home-") as home:  # a fresh store: no cache from other runs
        r = subprocess.run([sys.executable, __file__, "--work", str(work), "--child", *argv], capture_output=True,
                           text=True, env={**os.environ, "MEDGEMMA_HOME": home})
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smoke.add_arguments(ap)
    ap.add_argument("--model", type=Path, help="a converted 4B-shaped folder with mmproj.gguf and vision.onnx")
    ap.add_argument("--images", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--same-picture", action="store_true",
                    help="every slice the same picture: the text phase, which is what grows with slices, is the "
                         "same, and ask's embedding cache encodes it once (the bare route still encodes each)")
    ap.add_argument("--routes", nargs="+", default=["ours", "bare"], choices=["ours", "bare"])
    ap.add_argument("--parts", nargs="+", default=["text", "series", "onnx"], choices=["text", "series", "onnx"])
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = smoke.parse(ap, images=[1, 2], threads=1)
    if args.child:
        kind, model, *rest = args.child
        if kind == "onnx":
            out = child_onnx(Path(model), rest[0] == "on", args.threads)
        elif kind == "text":
            out = child_text(Path(model), rest[0] == "mapped", args.threads)
        else:
            n, size = int(rest[0]), int(rest[1])
            images = _images(args.work, n, size, same=args.same_picture)
            out = child_bare(Path(model), images, args.threads) if kind == "bare" else \
                child_ours(Path(model), images, args.threads, kind.split(":")[1])
        print(json.dumps(out))
        return
    from medgemma_cli.llama.model_files import resolve_model
    from medgemma_cli.machine import cpu_model

    model = args.model or args.work / "vision-4b-q4_k_m-onnx-int8"
    if args.smoke:
        from medgemma_cli.conversion import convert
        from medgemma_cli.synthetic import make_checkpoint

        print(json.dumps({"smoke": smoke.NOTE, "shape": "tiny"}), flush=True)
        model = args.work / "memory-tiny-q4_k_m"
        convert(make_checkpoint(args.work / "synthetic-tiny", "tiny"), model, preset="Q4_K_M", overwrite=True)
    files = resolve_model(model)
    size = files.vision["image_size"] if files.vision else 896
    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
                      "text_gguf_bytes": files.text.stat().st_size,
                      "mmproj_bytes": files.mmproj.stat().st_size if files.mmproj else 0,
                      "vision_onnx_bytes": sum(p.stat().st_size for p in files.vision_onnx.parent.glob("vision.onnx*"))
                      if files.vision_onnx else 0}), flush=True)
    for how in ("mapped", "read") if "text" in args.parts else ():
        r = run_child(args.work, ["text", str(model), how])
        print(json.dumps({"run": f"text model alone, extra buffers, file {how}", **r}), flush=True)
    for n in args.images if "series" in args.parts else ():
        runs = [("ask (f16 KV)", "ours:f16")] if "ours" in args.routes else []
        if n == args.images[0] and "ours" in args.routes:
            runs.append(("ask --kv-type q8_0", "ours:q8_0"))
        if "bare" in args.routes:
            runs.append(("bare llama-cpp-python + libmtmd", "bare"))
        for label, kind in runs:
            argv = [kind, str(model), str(n), str(size)] + (["--same-picture"] if args.same_picture else [])
            r = run_child(args.work, argv)
            print(json.dumps({"images": n, "run": label, "same_picture": args.same_picture, **r}), flush=True)
    for arena in ("on", "off") if "onnx" in args.parts else ():
        r = run_child(args.work, ["onnx", str(model), arena])
        print(json.dumps({"run": f"onnx encoder alone, arena {arena}", **r}), flush=True)


if __name__ == "__main__":
    main()
