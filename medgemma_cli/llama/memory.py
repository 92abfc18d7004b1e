"""The memory a run will need at its peak, by component, before anything is loaded: so that `ask`, `chat` and
`batch` can say it and refuse a run that would not fit (a laptop swapping for an hour is worse than an error).

Every figure comes from the files' own metadata and llama.cpp's sizing rules; the constants below were measured
with benchmarks/memory_4b.py (peak RSS of one process per configuration, AMD EPYC, 2 cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medgemma_cli.errors import MedgemmaError
from medgemma_cli.llama.model_files import ModelFiles, vision_backend_for

GIB = 1024 ** 3
N_UBATCH = 512  # the Engine's micro-batch (llama.cpp reserves its output logits for this many tokens)
KV_PAD = 256  # llama.cpp pads a cache's cell count to this
SWA_PATTERN = 6  # Gemma 3: every sixth layer attends globally, the others within the sliding window
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32}  # per element (q8_0: 32 values and one f16 scale per block)
RUNTIME_BYTES = 300 * 1024 ** 2  # Python, numpy, llama.cpp's and ONNX Runtime's code, the inputs' pixels


@dataclass
class MemoryEstimate:
    """Expected peak resident memory of one model process, in bytes, and what the machine has available."""
    text_weights: int
    kv_cache: int
    compute: int
    vision: int
    runtime: int
    available: int
    embeddings: int = 0  # the images' embeddings, when encoded before the text model loads
    vision_apart: bool = False  # the encoder is freed before the text model loads (ask, chat on ONNX Runtime)

    @property
    def peak(self) -> int:
        text = self.text_weights + self.kv_cache + self.compute + self.embeddings + self.runtime
        if self.vision_apart:
            return max(text, self.vision + self.embeddings + self.runtime)
        return text + self.vision

    def as_dict(self) -> dict[str, Any]:
        return {"peak": self.peak, "text_weights": self.text_weights, "kv_cache": self.kv_cache,
                "compute": self.compute, "vision": self.vision, "embeddings": self.embeddings,
                "vision_apart": self.vision_apart, "runtime": self.runtime, "available": self.available}

    def summary(self) -> str:
        return (f"expected peak memory {self.peak / GIB:.1f} GB (weights {self.text_weights / GIB:.1f}, "
                f"KV cache {self.kv_cache / GIB:.2f}, compute {self.compute / GIB:.2f}, vision {self.vision / GIB:.2f})"
                f"; {self.available / GIB:.1f} GB available")


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def kv_cache_bytes(meta: dict[str, Any], n_ctx: int, kv_type: str = "f16", swa_full: bool = True,
                   n_ubatch: int = N_UBATCH) -> int:
    """llama.cpp's KV cache for a Gemma 3 text model: the global layers hold n_ctx cells; the sliding-window
    layers as many, or (swa_full=False) the window plus one micro-batch."""
    arch = meta.get("general.architecture", "gemma3")
    layers = int(meta.get(f"{arch}.block_count", 0))
    heads_kv = int(meta.get(f"{arch}.attention.head_count_kv", 0))
    width = int(meta.get(f"{arch}.attention.key_length", 0)) + int(meta.get(f"{arch}.attention.value_length", 0))
    window = int(meta.get(f"{arch}.attention.sliding_window", 0))
    cells = _pad(n_ctx, KV_PAD)
    n_global = layers // SWA_PATTERN if window else layers
    swa_cells = cells if swa_full else min(cells, _pad(window + n_ubatch, KV_PAD))
    per_cell = heads_kv * width * KV_BYTES[kv_type]
    return int(per_cell * (n_global * cells + (layers - n_global) * swa_cells))


def vision_bytes(files: ModelFiles, backend: str) -> int:
    """The encoder's weights and its largest activations for one image: one layer's attention scores (heads ×
    queries × patches as float32) and their softmax, which SigLIP's attention holds at once, and the MLP's hidden
    activations (patches × ffn, before and after GELU). The queries are all the patches, or one block of them
    where vision.onnx was written in query blocks (its manifest says). ONNX weights are the graph and its data."""
    from medgemma_cli.kernels.ggml import read_gguf_info

    if files.mmproj is None or backend == "none":
        return 0
    info = read_gguf_info(files.mmproj, keys={"clip.vision.image_size", "clip.vision.patch_size",
                                              "clip.vision.attention.head_count", "clip.vision.feed_forward_length"})
    patches = (int(info.get("clip.vision.image_size", 0)) // int(info.get("clip.vision.patch_size", 1))) ** 2
    heads = int(info.get("clip.vision.attention.head_count", 0))
    block = files.vision_onnx_attention_block if backend == "onnx" else None
    scores = 2 * heads * min(patches, block or patches) * patches * 4
    mlp = 2 * patches * int(info.get("clip.vision.feed_forward_length", 0)) * 4
    if backend == "onnx" and files.vision_onnx:
        graph = files.vision_onnx
        weights = sum(p.stat().st_size for p in (graph, graph.with_name(graph.name + ".data")) if p.is_file())
    else:
        weights = files.mmproj.stat().st_size
    return weights + scores + mlp


def estimate_memory(files: ModelFiles, n_ctx: int, n_images: int, *, kv_type: str = "f16", swa_full: bool = True,
                    vision_backend: str = "auto", gpu_layers: int | None = None,
                    encode_first: bool = False) -> MemoryEstimate:
    """The expected peak of a run on the CPU (on a GPU most of it sits in the GPU's memory instead).
    `encode_first`: ONNX Runtime encodes every image and is freed before the text model loads."""
    from medgemma_cli import machine
    from medgemma_cli.kernels.ggml import read_gguf_info

    arch = read_gguf_info(files.text, keys={"general.architecture"}).get("general.architecture", "gemma3")
    meta = read_gguf_info(files.text, keys={"general.architecture"} | {f"{arch}.{k}" for k in (
        "block_count", "embedding_length", "attention.head_count_kv", "attention.key_length",
        "attention.value_length", "attention.sliding_window")})
    weights = sum(t.size for t in meta.tensors)
    n_vocab = next((t.ne[1] for t in meta.tensors if t.name == "token_embd.weight"), 0)
    compute = n_vocab * N_UBATCH * 4 + int(meta.kv.get(f"{arch}.embedding_length", 0)) * N_UBATCH * 4 * 8
    backend = vision_backend_for(files, vision_backend, gpu_layers) if n_images else "none"
    apart = encode_first and backend == "onnx"
    n_embd = int(meta.kv.get(f"{arch}.embedding_length", 0))
    image_tokens = (files.vision or {}).get("image_tokens", 0) if apart else 0
    return MemoryEstimate(text_weights=weights, kv_cache=kv_cache_bytes(meta.kv, n_ctx, kv_type, swa_full),
                          compute=compute, vision=vision_bytes(files, backend), runtime=RUNTIME_BYTES,
                          available=machine.available_memory_bytes(), embeddings=n_images * image_tokens * n_embd * 4,
                          vision_apart=apart)


def check_memory(estimate: MemoryEstimate) -> None:
    """Refuse a run that would need more memory than is available (the caller can choose to go on)."""
    if estimate.available and estimate.peak > estimate.available:
        raise MedgemmaError(f"this run needs about {estimate.peak / GIB:.1f} GB of memory at its peak but "
                            f"{estimate.available / GIB:.1f} GB is available ({estimate.summary()}); send fewer "
                            "images (--max-slices), use --kv-type q8_0, close other programs, or go on anyway "
                            "with --no-memory-check")
