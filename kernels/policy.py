"""Quantization presets and the per-tensor type policy: which tensor gets which GGUF type.

The text-model rules reproduce llama.cpp's `llama_tensor_get_type` for Gemma 3 (a dense model with tied
embeddings), so a one-pass conversion writes the same types llama-quantize would; the oracle test checks it
byte for byte. The vision projector's rules are ours: llama.cpp misbehaves with some of its tensors quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, LlamaFileType


@dataclass(frozen=True)
class Preset:
    name: str
    file_type: LlamaFileType
    default: Q  # every quantizable 2-D weight, unless a rule below says otherwise
    embeddings: Q | None = None  # token_embd (doubles as the output matrix in Gemma): None = default
    sensitive: Q | None = None  # attn_v and ffn_down in the "more bits" layers: None = default


# One row per preset (llama.cpp's ftype names).
PRESETS: dict[str, Preset] = {
    "F32": Preset("F32", LlamaFileType.ALL_F32, Q.F32),
    "F16": Preset("F16", LlamaFileType.MOSTLY_F16, Q.F16),
    "BF16": Preset("BF16", LlamaFileType.MOSTLY_BF16, Q.BF16),
    "Q8_0": Preset("Q8_0", LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "Q6_K": Preset("Q6_K", LlamaFileType.MOSTLY_Q6_K, Q.Q6_K, embeddings=Q.Q6_K),
    "Q5_K_M": Preset("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K, embeddings=Q.Q6_K, sensitive=Q.Q6_K),
    "Q4_K_M": Preset("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K, embeddings=Q.Q6_K, sensitive=Q.Q6_K),
    "Q4_0": Preset("Q4_0", LlamaFileType.MOSTLY_Q4_0, Q.Q4_0, embeddings=Q.Q6_K),
}
DEFAULT_PRESET = "Q4_K_M"

# When a row is not a whole number of blocks, llama.cpp falls back to a type with smaller blocks,
# and to F16 when even that does not fit (llama-quant.cpp's tensor-type fallback).
FALLBACK: dict[Q, Q] = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.Q2_K: Q.IQ4_NL, Q.Q3_K: Q.IQ4_NL}

# The vision projector (mmproj): its own, simpler policy.
MMPROJ_TYPES: dict[str, Q] = {"F32": Q.F32, "F16": Q.F16, "Q8_0": Q.Q8_0}
DEFAULT_MMPROJ_TYPE = "F16"
MMPROJ_FILE_TYPES = {Q.F32: LlamaFileType.ALL_F32, Q.F16: LlamaFileType.MOSTLY_F16, Q.Q8_0: LlamaFileType.MOSTLY_Q8_0}
MMPROJ_KEEP: dict[str, Q] = {  # precision matters more than size here
    "v.patch_embd.weight": Q.F32,
    "v.position_embd.weight": Q.F32,
    "mm.input_projection.weight": Q.F16,
}


def block_size(qtype: Q) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fit(qtype: Q, row: int) -> Q:
    """The type actually used for rows of `row` values (llama.cpp's tensor_type_fallback)."""
    if row % block_size(qtype) == 0:
        return qtype
    fallback = FALLBACK.get(qtype, qtype)
    return fallback if row % block_size(fallback) == 0 else Q.F16


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def text_tensor_type(preset: Preset, name: str, shape: tuple[int, ...], layer: int | None, n_layers: int) -> Q:
    """Type of one text-model tensor (`shape` in numpy order, so the row length is shape[-1])."""
    if not _quantizable(name, shape):
        return Q.F32
    qtype = preset.default
    if preset.default in (Q.F32, Q.F16, Q.BF16):
        return qtype
    row = shape[-1]
    if name == "token_embd.weight":  # tied embeddings get the output matrix's rule
        if row % block_size(qtype):
            return Q.Q8_0
        # the preset's embedding type is checked against the row like every other type: Q4_0's rows of 640
        # are whole Q4_0 blocks, so llama.cpp picks Q6_K, then falls back to Q8_0 (640 is not 256 × n)
        qtype = preset.embeddings or qtype
    elif (preset.sensitive is not None and layer is not None and (".attn_v." in name or ".ffn_down." in name)
          and more_bits(layer, n_layers)):
        qtype = preset.sensitive
    return fit(qtype, row)


def mmproj_tensor_type(qtype: Q, gguf_name: str, shape: tuple[int, ...]) -> Q:
    if len(shape) == 1:
        return Q.F32
    if gguf_name in MMPROJ_KEEP:
        return Q.F32 if qtype == Q.F32 else MMPROJ_KEEP[gguf_name]
    return fit(qtype, shape[-1]) if qtype not in (Q.F32, Q.F16) else qtype


def nbytes(qtype: Q, shape: tuple[int, ...]) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block * size
