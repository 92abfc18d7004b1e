"""MedGemma's vision tower on ONNX Runtime (`vision.onnx`, written by `convert --vision-onnx`): on CPUs it
encodes an image several times faster than libmtmd; its embeddings go into the context through libmtmd."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgemma_cli import stopping
from medgemma_cli.containment import stage

if TYPE_CHECKING:
    from medgemma_cli.llama.caches import EmbeddingCache


class OnnxVision:
    """MedGemma's vision tower + projector on ONNX Runtime: RGB images → the embeddings mtmd would produce."""

    def __init__(self, path: Path, threads: int, mean: float = 0.5, std: float = 0.5):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        # no arena: ONNX Runtime's CPU arena keeps the largest activations it ever held (the attention scores
        # of a 4,096-patch image, all of them in a vision.onnx written before the query blocks) for the life of
        # the session; without it they go back as each node finishes
        opts.enable_cpu_mem_arena = False
        self.session: Any = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.mean, self.std = mean, std

    def close(self) -> None:
        """Drop the session (its weights and buffers); encode() cannot be called afterwards."""
        self.session = None

    def encode(self, rgb: np.ndarray) -> np.ndarray:
        """One H×W×3 uint8 image at the model's input size → [image tokens, text width] float32."""
        x = (rgb.astype(np.float32) / 255.0 - self.mean) / self.std
        px = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        return np.ascontiguousarray(stopping.run_onnx(self.session, {"pixel_values": px})[0][0], dtype=np.float32)


def encode_first(path: Path, images: list[np.ndarray], threads: int, cache: EmbeddingCache | None = None,
                 on_image: Callable[[int, int], None] | None = None) -> tuple[list[np.ndarray], int]:
    """Encode every image and free ONNX Runtime before the text model loads: its weights and activations (the
    4B tower's peak: 0.95 GB in query blocks, 1.9 GB for a vision.onnx written before them, which holds a layer's
    attention scores at once) then never sit in memory beside the text weights. Images the
    embedding cache holds are taken from it (ONNX Runtime is not even loaded when it holds them all).
    Returns the embeddings and how many were encoded here."""
    out: list[np.ndarray] = []
    vision: OnnxVision | None = None
    fresh = 0
    try:
        for i, rgb in enumerate(images, 1):
            embd = cache.get(rgb) if cache is not None else None
            if embd is None:
                with stage("ONNX Runtime", "loading the vision encoder" if vision is None else f"encoding image {i}"):
                    vision = vision or OnnxVision(path, threads)
                with stage("ONNX Runtime", f"encoding image {i}"):
                    embd = vision.encode(rgb)
                fresh += 1
                if cache is not None:
                    embd = cache.put(rgb, embd)
            out.append(embd)
            if on_image is not None:
                on_image(i, len(images))
        return out, fresh
    finally:
        if vision is not None:
            vision.close()
