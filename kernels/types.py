"""Quantization presets, the per-tensor type policy, and float32 → block encoding.

A preset names what the user asks for (`Q4_K_M`); the policy decides, tensor by tensor, what is actually
written (norms stay F32, rows that are not a multiple of a block fall back to F16, the vision projector's
fragile tensors keep their precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, LlamaFileType

from medgemma_cli.converters.safetensors_io import float32_to_bf16_bits
from medgemma_cli.kernels import ggml


@dataclass(frozen=True)
class Preset:
    name: str
    file_type: LlamaFileType
    # Written by us tensor by tensor; None: the text model goes through llama.cpp's quantizer.
    direct_type: Q | None


PRESETS: dict[str, Preset] = {
    "F32": Preset("F32", LlamaFileType.ALL_F32, Q.F32),
    "F16": Preset("F16", LlamaFileType.MOSTLY_F16, Q.F16),
    "BF16": Preset("BF16", LlamaFileType.MOSTLY_BF16, Q.BF16),
    "Q8_0": Preset("Q8_0", LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "Q6_K": Preset("Q6_K", LlamaFileType.MOSTLY_Q6_K, None),
    "Q5_K_M": Preset("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, None),
    "Q4_K_M": Preset("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, None),
}
DEFAULT_PRESET = "Q4_K_M"
MMPROJ_TYPES: dict[str, Q] = {"F32": Q.F32, "F16": Q.F16, "Q8_0": Q.Q8_0}
DEFAULT_MMPROJ_TYPE = "F16"
MMPROJ_FILE_TYPES = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.Q8_0: LlamaFileType.MOSTLY_Q8_0}

# mmproj tensors whose precision matters more than their size (llama.cpp misbehaves with them quantized).
MMPROJ_KEEP: dict[str, Q] = {
    "v.patch_embd.weight": Q.F32,
    "v.position_embd.weight": Q.F32,
    "mm.input_projection.weight": Q.F16,
}


def block_size(qtype: Q) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def _fits(qtype: Q, shape: tuple[int, ...]) -> Q:
    """Fall back to F16 when rows are not whole blocks (SigLIP's 4304-wide ffn_down, say)."""
    return qtype if shape[-1] % block_size(qtype) == 0 else Q.F16


def text_tensor_type(qtype: Q, shape: tuple[int, ...]) -> Q:
    """Type of one text-model tensor under a directly written preset (shape in numpy order)."""
    if len(shape) == 1:
        return Q.F32
    return _fits(qtype, shape)


def mmproj_tensor_type(qtype: Q, gguf_name: str, shape: tuple[int, ...]) -> Q:
    if len(shape) == 1:
        return Q.F32
    if gguf_name in MMPROJ_KEEP:
        keep = MMPROJ_KEEP[gguf_name]
        return Q.F32 if qtype == Q.F32 else keep
    return _fits(qtype, shape)


def nbytes(qtype: Q, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block * size


def encode(rows: np.ndarray, qtype: Q, threads: int = 1) -> np.ndarray:
    """float32 rows → the bytes of `qtype`; block types through ggml's own quantizers."""
    if qtype == Q.F32:
        return np.ascontiguousarray(rows, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(rows, dtype=np.float16)
    if qtype == Q.BF16:
        return float32_to_bf16_bits(rows)
    return ggml.quantize(rows, int(qtype), threads=threads)
