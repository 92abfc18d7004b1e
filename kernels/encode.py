"""float32 rows → the bytes of a GGUF type."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

from medgemma_cli.converters.safetensors_io import float32_to_bf16_bits
from medgemma_cli.kernels import ggml


def encode(rows: np.ndarray, qtype: Q, threads: int = 1, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Plain types in numpy; every block type through ggml's own quantizers (what llama-quantize runs)."""
    if qtype == Q.F32:
        return np.ascontiguousarray(rows, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(rows, dtype=np.float16)
    if qtype == Q.BF16:
        return float32_to_bf16_bits(rows)
    return ggml.quantize(rows, int(qtype), threads=threads, imatrix=imatrix)
