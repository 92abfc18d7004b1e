"""Benchmark: ONNX Runtime's peak memory and time for one 896 px image on the 4B shape's vision tower
(SigLIP-400M, 27 layers, 16 heads, 4,096 patches + the projector), random weights, fp32 and int8, with the
attention written whole (block 0: one layer's 16 × 4,096² scores at once, the formulation of vision.onnx files
written before issue #18) and in query blocks of several sizes.

Each graph is written by the converter's own code (converters/vision_onnx.vision_graph) in one child process and
run in another, through the runtime's own OnnxVision (arena off, as `ask` runs it), which reports its VmHWM.
Every blocked graph's embeddings are compared with the whole formulation's for the same weights and image.

Then one self-attention layer alone (4,096 × 1,152 in), whole, in blocks, and as ONNX Runtime's contrib
op com.microsoft.MultiHeadAttention, whose CPU kernel takes a flash-attention path (no score matrix) only where
ONNX Runtime finds the CPU's L2 cache size and ORT_DISABLE_FLASH_ATTENTION is unset, and otherwise computes every
score at once: both ways are run, to show why the converter writes blocks of standard operators instead.

    python benchmarks/attention_4b.py --work DIR                     # blocks 0 256 512 1024, fp32 and int8
    python benchmarks/attention_4b.py --work DIR --blocks 0 512 --presets int8
    python benchmarks/attention_4b.py --smoke                        # the tiny shape, in seconds; figures mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import smoke


def _status_bytes(field: str) -> int:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) * 1024


def _graph_path(work: Path, shape: str, preset: str, block: int) -> Path:
    return work / f"attention-{shape}-{preset}-block{block}" / "vision.onnx"


def child_write(work: Path, shape: str, preset: str, block: int) -> dict:
    import onnx

    from medgemma_cli.converters.vision_onnx import vision_graph
    from medgemma_cli.synthetic import vision_weights

    dst = _graph_path(work, shape, preset, block)
    dst.parent.mkdir(parents=True, exist_ok=True)
    spec, get = vision_weights(shape)
    t0 = time.perf_counter()
    with open(dst.parent / "vision.onnx.data", "wb") as data:
        model = vision_graph(get, spec, int8=preset == "int8", data_file=data, data_location="vision.onnx.data",
                             attention_block=block or None)
    onnx.save_model(model, str(dst))
    return {"written_s": round(time.perf_counter() - t0, 1)}


def child_run(work: Path, shape: str, preset: str, block: int, threads: int, repeats: int) -> dict:
    import numpy as np

    from medgemma_cli.llama.onnx_vision import OnnxVision
    from medgemma_cli.synthetic import SHAPES

    size = SHAPES[shape].vision["image_size"]
    rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    enc = OnnxVision(_graph_path(work, shape, preset, block), threads=threads)
    load_s = time.perf_counter() - t0
    loaded = _status_bytes("VmRSS")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = enc.encode(rgb)
        times.append(time.perf_counter() - t0)
    np.save(_graph_path(work, shape, preset, block).parent / "embeddings.npy", out)
    return {"peak_bytes": _status_bytes("VmHWM"), "after_load_bytes": loaded, "load_s": round(load_s, 1),
            "s_per_image": round(min(times), 2)}


def one_layer_graph(kind: str, block: int, tokens: int, heads: int, head_dim: int) -> bytes:
    """One self-attention layer: x [1, tokens, heads × head_dim] in, attended over itself, out."""
    from onnx import TensorProto, helper

    from medgemma_cli.converters.onnx_graph import GraphBuilder

    dim = heads * head_dim
    gb = GraphBuilder("one_layer", attention_block=block or None)
    x = gb.input("x", TensorProto.FLOAT, [1, tokens, dim])
    # identity projections, through the same linears in both (their cost is not what is compared)
    eye, zero = np.eye(dim, dtype=np.float32), np.zeros(dim, np.float32)
    if kind == "mha":
        qkv = [gb.linear(x, eye, zero, f"{n}_proj") for n in "qkv"]
        out = gb.linear(gb.op("MultiHeadAttention", qkv, domain="com.microsoft", num_heads=heads), eye, zero, "out")
    else:
        out = gb.attention(x, x, lambda _: eye, "attn", heads, dim, qkv=(eye, zero, eye, zero, eye, zero, eye, zero),
                           queries=tokens)
    gb.output(out, "out", [1, tokens, dim])
    model = gb.model()
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model.SerializeToString()


def child_one_layer(kind: str, block: int, tokens: int, heads: int, head_dim: int, threads: int) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_cpu_mem_arena = False  # as OnnxVision runs
    opts.log_severity_level = 3
    session = ort.InferenceSession(one_layer_graph(kind, block, tokens, heads, head_dim), opts,
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, tokens, heads * head_dim), dtype=np.float32)
    loaded = _status_bytes("VmRSS")
    t0 = time.perf_counter()
    out = session.run(None, {"x": x})[0]
    elapsed = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")

    def split(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float64).reshape(tokens, heads, head_dim).transpose(1, 0, 2)

    scores = split(x) @ split(x).transpose(0, 2, 1) * head_dim ** -0.5
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    ref = ((probs / probs.sum(-1, keepdims=True)) @ split(x)).transpose(1, 0, 2).reshape(1, tokens, -1)
    return {"peak_above_inputs_bytes": peak - loaded, "s": round(elapsed, 2),
            "max_abs_err_vs_float64": float(np.abs(out - ref).max())}


def run_child(work: Path, argv: list[str], env: dict[str, str] | None = None) -> dict:
    r = subprocess.run([sys.executable, __file__, "--work", str(work), "--child", *argv], capture_output=True,
                       text=True, env={**os.environ, **(env or {})})
    if r.returncode:
        return {"error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return round(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), 9)


def compare(work: Path, shape: str, preset: str, block: int) -> dict:
    """The blocked graph's embeddings against the whole formulation's (block 0) for the same weights and image;
    int8's also against fp32's whole formulation, the reference int8 is an approximation of (a rounding change
    of one ulp in an activation moves int8's dynamic quantization by a step, so int8 against int8 differs more
    than fp32 against fp32 for the same exact rewrite)."""
    def load(p: str, b: int) -> np.ndarray | None:
        path = _graph_path(work, shape, p, b).parent / "embeddings.npy"
        return np.load(path) if path.is_file() else None

    got, ref, fp32 = load(preset, block), load(preset, 0), load("fp32", 0)
    out: dict = {}
    if got is not None and ref is not None and block:
        out.update(max_abs_diff_vs_block0=float(np.abs(ref - got).max()), max_abs_block0=float(np.abs(ref).max()),
                   cosine_vs_block0=_cosine(got, ref))
    if got is not None and fp32 is not None and preset == "int8":
        out["cosine_vs_fp32_block0"] = _cosine(got, fp32)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smoke.add_arguments(ap)
    ap.add_argument("--shape", default="4b", help=argparse.SUPPRESS)
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 256, 512, 1024],
                    help="queries per attention block; 0 writes the attention whole (the old formulation)")
    ap.add_argument("--presets", nargs="*", default=["fp32", "int8"], choices=["fp32", "int8"],
                    help="the towers to write and run (none: only the one-layer comparison)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="images encoded per graph (the fastest is reported)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = smoke.parse(ap, shape="tiny", blocks=[0, 24], threads=1)  # the tiny tower has 64 patches
    if args.child:
        if args.child[0] == "one_layer":
            kind, block, tokens, heads, head_dim, threads = args.child[1], *map(int, args.child[2:7])
            print(json.dumps(child_one_layer(kind, block, tokens, heads, head_dim, threads)))
            return
        kind, shape, preset, block = args.child[0], args.child[1], args.child[2], int(args.child[3])
        out = child_write(args.work, shape, preset, block) if kind == "write" else \
            child_run(args.work, shape, preset, block, int(args.child[4]), int(args.child[5]))
        print(json.dumps(out))
        return
    from medgemma_cli.converters.vision_onnx import ATTENTION_BLOCK
    from medgemma_cli.machine import cpu_model
    from medgemma_cli.synthetic import SHAPES

    if args.smoke:
        print(json.dumps({"smoke": smoke.NOTE, "shape": args.shape}), flush=True)
    v = SHAPES[args.shape].vision
    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads,
                      "load": round(os.getloadavg()[0], 1), "patches": (v["image_size"] // v["patch_size"]) ** 2,
                      "heads": v["num_attention_heads"], "layers": v["num_hidden_layers"],
                      "converter_block": ATTENTION_BLOCK}), flush=True)
    blocks = sorted(set(args.blocks), key=lambda b: (b != 0, b))  # the whole formulation first: the reference
    for preset in args.presets:
        peaks = {}
        for block in blocks:
            path = _graph_path(args.work, args.shape, preset, block)
            written = {} if path.is_file() else run_child(args.work, ["write", args.shape, preset, str(block)])
            r = {**written, **run_child(args.work, ["run", args.shape, preset, str(block), str(args.threads),
                                                    str(args.repeats)])}
            if "error" not in r:
                r.update(compare(args.work, args.shape, preset, block))
                peaks[block] = r["peak_bytes"]
            r["vision_onnx_bytes"] = sum(p.stat().st_size for p in path.parent.glob("vision.onnx*"))
            print(json.dumps({"preset": preset, "attention_block": block, **r}), flush=True)
        if 0 in peaks and len(peaks) > 1:
            best = min((b for b in peaks if b), key=lambda b: peaks[b])
            print(json.dumps({"preset": preset, "summary": {
                "peak_bytes_block0": peaks[0], "lowest_peak_block": best, "lowest_peak_bytes": peaks[best],
                "saved_bytes": peaks[0] - peaks[best]}}), flush=True)
    tokens = (v["image_size"] // v["patch_size"]) ** 2
    layer = [str(tokens), str(v["num_attention_heads"]), str(v["hidden_size"] // v["num_attention_heads"])]
    runs = [("standard ops", block, {}) for block in blocks] + [
        ("MultiHeadAttention", 0, {}), ("MultiHeadAttention", 0, {"ORT_DISABLE_FLASH_ATTENTION": "1"})]
    for kind, block, env in runs:
        r = run_child(args.work, ["one_layer", "mha" if kind == "MultiHeadAttention" else "std", str(block), *layer,
                                  str(args.threads)], env)
        print(json.dumps({"one_layer": kind, "attention_block": block, "env": env, **r}), flush=True)


if __name__ == "__main__":
    main()
