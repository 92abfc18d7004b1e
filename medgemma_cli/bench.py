"""`medgemma bench`: what this machine can do with MedGemma, before anyone downloads a model.

Memory bandwidth, quantized matmul throughput through ggml's kernels, and end-to-end prompt/decode speed
on synthetic GGUF models of the real MedGemma shapes (random weights, built locally, cached).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from medgemma_cli import store
from medgemma_cli.atomic import replacing
from medgemma_cli.containment import stage
from medgemma_cli.converters import gemma3
from medgemma_cli.converters.gguf_stream import begin_gguf, misaligned_tensors, output_file
from medgemma_cli.kernels import ggml
from medgemma_cli.kernels.matmul import MatmulFigure, matmul_throughput
from medgemma_cli.kernels.policy import PRESETS, nbytes, text_tensor_type
from medgemma_cli.llama.loader import load_llama
from medgemma_cli.machine import physical_cores, total_memory_bytes


def memory_bandwidth(threads: int, size_mb: int = 1024, repeats: int = 3) -> float:
    """Read bandwidth in GB/s: `threads` threads reducing disjoint slices of a buffer larger than any cache
    (the best of two SIMD reductions, so the figure is the memory's, not numpy's)."""
    a = np.ones(size_mb * 1024 * 1024 // 8, dtype=np.uint64)
    parts = np.array_split(a, threads)
    kernels = (np.bitwise_or.reduce, lambda x: np.add.reduce(x.view(np.float32)))
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for kernel in kernels:
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(kernel, parts))
                best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def text_plan(shape: str, preset: str) -> list[tuple[str, tuple[int, ...], Q]]:
    """(GGUF name, numpy shape, type) of every text tensor of a MedGemma shape under a preset."""
    from medgemma_cli.synthetic import SHAPES

    s = SHAPES[shape]
    cfg = {"architectures": ["Gemma3ForCausalLM"], **s.text, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    spec = gemma3.read_spec(cfg, {}, None)
    out = []
    for _, dst, syms, _ in gemma3.expand(gemma3.TEXT_TENSORS, spec.text.layers):
        shp = tuple(spec.dims[d] for d in syms)
        layer = int(dst.split(".")[1]) if dst.startswith("blk.") else None
        out.append((dst, shp, text_tensor_type(PRESETS[preset], dst, shp, layer, spec.text.layers)))
    return out


def model_bytes(shape: str, preset: str) -> int:
    return sum(nbytes(q, shp) for _, shp, q in text_plan(shape, preset))


def synthetic_gguf(shape: str, preset: str = "Q4_K_M", folder: Path | None = None) -> Path:
    """A text GGUF of a real MedGemma shape with random weights, built directly (no checkpoint) and cached.

    Each tensor repeats one block of random rows quantized by ggml, so building costs a few seconds plus
    the disk write, and every value is finite."""
    from medgemma_cli.converters.tokenizer import read_vocabulary, write_vocabulary
    from medgemma_cli.synthetic import SHAPES, _tokenizer_files

    folder = folder or store.cache_dir() / "bench"
    path = folder / f"medgemma-{shape}-{preset.lower()}-random.gguf"
    if path.is_file() and not misaligned_tensors(ggml.read_gguf_info(path, keys=set())):
        return path  # (one cached before tensors were aligned is rebuilt: it would measure the misalignment)
    folder.mkdir(parents=True, exist_ok=True)
    s = SHAPES[shape]
    cfg = {"architectures": ["Gemma3ForCausalLM"], **s.text, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    spec = gemma3.read_spec(cfg, {}, None)
    tok_dir = folder / f".tokenizer-{os.getpid()}"
    tok_dir.mkdir(exist_ok=True)
    _tokenizer_files(tok_dir, s)
    vocab = read_vocabulary(tok_dir, spec.text.vocab)
    plan = text_plan(shape, preset)
    rng = np.random.default_rng(0)
    tiles: dict[tuple[Q, int], np.ndarray] = {}

    def tile(q: Q, row: int) -> np.ndarray:
        if (q, row) not in tiles:
            x = (rng.standard_normal((64, row), dtype=np.float32) * 0.02).astype(np.float32)
            from medgemma_cli.kernels.encode import encode

            tiles[(q, row)] = np.ascontiguousarray(encode(x, q)).view(np.uint8).reshape(64, -1)
        return tiles[(q, row)]

    try:
        with replacing(path) as tmp:
            def metadata(w: gguf.GGUFWriter) -> None:
                gemma3.write_text_metadata(w, spec, f"random MedGemma {shape}")
                w.add_file_type(int(PRESETS[preset].file_type))
                w.add_quantization_version(gguf.GGML_QUANT_VERSION)
                write_vocabulary(w, vocab)

            w = begin_gguf(tmp, "gemma3", metadata, [(name, shp, q, nbytes(q, shp)) for name, shp, q in plan])
            f = output_file(w)
            for _name, shp, q in plan:
                f.write(b"\0" * (-f.tell() % w.data_alignment))
                if len(shp) == 1:
                    f.write((np.ones(shp, np.float32) + rng.standard_normal(shp, dtype=np.float32) * 0.1).tobytes())
                    continue
                t = tile(q, shp[-1])
                rows = int(np.prod(shp[:-1]))
                block = np.tile(t, (max(1, 4096 // t.shape[0]), 1))
                done = 0
                while done < rows:
                    n = min(block.shape[0], rows - done)
                    f.write(block[:n].data.cast("B"))
                    done += n
            f.write(b"\0" * (-f.tell() % w.data_alignment))
            w.close()
    finally:
        for p in tok_dir.iterdir():
            p.unlink()
        tok_dir.rmdir()
    return path


@dataclass
class EndToEnd:
    shape: str
    preset: str
    threads: int
    model_bytes: int
    prompt_tokens: int
    prompt_tokens_per_s: float
    decode_tokens: int
    decode_tokens_per_s: float
    bandwidth_bound_tokens_per_s: float = 0.0
    ratio_to_bound: float = 0.0
    extra_buffers: bool = False  # llama.cpp's extra CPU buffer types (AMX, repacked weights) were on
    buffer_types: list[str] = field(default_factory=list)  # the weight buffers llama.cpp reported using


def end_to_end(path: Path, shape: str, preset: str, threads: int, prompt_tokens: int, decode_tokens: int,
               extra_buffers: bool | None = None) -> EndToEnd:
    """Prompt processing and greedy-style decoding (one token per step) through llama-cpp-python, with extra
    buffer types as this machine's verdict says (or as `extra_buffers` says)."""
    from llama_cpp import _logger

    from medgemma_cli.llama.loader import buffer_types_used, verdict

    _logger.set_verbose(False)
    extra = verdict().enabled if extra_buffers is None else extra_buffers
    with stage("llama.cpp", "loading the benchmark model"), buffer_types_used() as buffers:
        llm = load_llama(path, use_extra_buffers=extra, n_ctx=prompt_tokens + decode_tokens + 16,
                         n_batch=max(prompt_tokens, 8), n_threads=threads, n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(1)
    prompt = [2, *rng.integers(10, 900, prompt_tokens - 1).tolist()]
    with stage("llama.cpp", "reading the benchmark prompt"):
        t0 = time.perf_counter()
        llm.eval(prompt)
        pp = prompt_tokens / (time.perf_counter() - t0)
    with stage("llama.cpp", "decoding the benchmark tokens"):
        t0 = time.perf_counter()
        for tok in rng.integers(10, 900, decode_tokens).tolist():
            llm.eval([tok])
        tg = decode_tokens / (time.perf_counter() - t0)
    llm.close()
    size = sum(t.size for t in ggml.read_gguf_info(path, keys=set()).tensors)
    return EndToEnd(shape, preset, threads, size, prompt_tokens, round(pp, 2), decode_tokens, round(tg, 2),
                    extra_buffers=extra, buffer_types=sorted(set(buffers)))


@dataclass
class BenchReport:
    cores: int
    physical_cores: int
    memory_bytes: int
    bandwidth_gbps: dict[int, float] = field(default_factory=dict)
    matmul: list[MatmulFigure] = field(default_factory=list)
    end_to_end: list[EndToEnd] = field(default_factory=list)
    recommendation: dict[str, Any] = field(default_factory=dict)
    extra_buffers: dict[str, Any] = field(default_factory=dict)  # the verdict the end-to-end runs followed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def recommend(report: BenchReport) -> dict[str, Any]:
    mem = report.memory_bytes
    threads = report.physical_cores
    fits = {f"27b {p}": model_bytes("27b", p) + (2 << 30) <= mem * 0.9 for p in ("Q4_K_M", "Q8_0")}
    fits.update({f"4b {p}": model_bytes("4b", p) + (1 << 30) <= mem * 0.9 for p in ("Q4_K_M", "Q8_0")})
    bw = max(report.bandwidth_gbps.values()) if report.bandwidth_gbps else 0.0
    est = {f"{s} {p}": round(bw * 1e9 / model_bytes(s, p), 2) for s in ("4b", "27b") for p in ("Q4_K_M", "Q8_0")}
    preset = "Q4_K_M"  # decoding is memory-bound on CPUs: fewer bytes per token is faster
    notes = [f"Use --threads {threads} (one per physical core)."]
    if fits["27b Q4_K_M"]:
        notes.append("MedGemma 27B (Q4_K_M) fits in this machine's memory.")
    else:
        notes.append("MedGemma 27B does not fit in this machine's memory; use the 4B model.")
    return {"preset": preset, "threads": threads, "fits": fits, "decode_bound_tokens_per_s": est, "notes": notes}


def run_bench(shapes: list[str] | None = None, preset: str = "Q4_K_M", threads: list[int] | None = None,
              prompt_tokens: int = 64, decode_tokens: int = 16, matmul_types: list[str] | None = None,
              on_step: Callable[[str], None] | None = None, compare_extra_buffers: bool = False) -> BenchReport:
    """`compare_extra_buffers`: run each model with llama.cpp's extra buffer types off as well (where the
    verdict allows them on; they are never tried where the probe found them unsafe)."""
    from medgemma_cli.llama.loader import verdict

    step = on_step or (lambda s: None)
    phys = physical_cores()
    threads = threads or sorted({1, phys})
    report = BenchReport(os.cpu_count() or 1, phys, total_memory_bytes())
    for t in threads:
        step(f"memory bandwidth, {t} thread(s)")
        report.bandwidth_gbps[t] = round(memory_bandwidth(t), 2)
    for name in matmul_types or ["Q4_K", "Q6_K", "Q8_0", "F16"]:
        for t in threads:
            step(f"{name} matmul, {t} thread(s)")
            for m in (1, 64):
                f = matmul_throughput(Q[name], m=m, threads=t, repeats=3 if m == 64 else 10)
                report.matmul.append(MatmulFigure(f.type, f.threads, f.m, round(f.seconds, 6), round(f.gflops, 2),
                                                  round(f.weight_gbps, 2)))
    for shape in shapes if shapes is not None else ["4b"]:
        step(f"building the synthetic {shape} {preset} model (cached)")
        path = synthetic_gguf(shape, preset)
        t = max(threads)
        v = verdict()
        report.extra_buffers = v.as_dict()
        for extra in ([True, False] if compare_extra_buffers and v.enabled else [v.enabled]):
            step(f"{shape} {preset}: {prompt_tokens}-token prompt, {decode_tokens} decoded tokens, {t} threads, "
                 f"extra buffers {'on' if extra else 'off'}")
            e = end_to_end(path, shape, preset, t, prompt_tokens, decode_tokens, extra_buffers=extra)
            bw = report.bandwidth_gbps.get(t) or max(report.bandwidth_gbps.values())
            e.bandwidth_bound_tokens_per_s = round(bw * 1e9 / e.model_bytes, 2)
            e.ratio_to_bound = round(e.decode_tokens_per_s / e.bandwidth_bound_tokens_per_s, 3)
            report.end_to_end.append(e)
    report.recommendation = recommend(report)
    return report
