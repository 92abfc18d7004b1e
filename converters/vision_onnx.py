"""MedGemma's vision tower + Gemma 3 projector as one ONNX graph (`vision.onnx`), for ONNX Runtime int8 on CPUs.

On a CPU-only workstation the image encoder is the wait: llama.cpp's mtmd spends most of the time to first
token in it, while ONNX Runtime's dynamic int8 kernels run the same SigLIP tower several times faster.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from medgemma_cli.converters import gemma3
from medgemma_cli.converters.checkpoint import Checkpoint
from medgemma_cli.converters.onnx_graph import GraphBuilder, gemma3_projector, siglip_vision_tower

VISION_ONNX_PRESETS = ("int8", "fp32", "none")
# Queries per attention block in the encoder (GraphBuilder.attention), chosen by benchmarks/attention_4b.py on the
# 4B shape (4,096 patches, 16 heads, AMD EPYC, 2 threads): the int8 tower's peak is 1.93 GB with every score at
# once, 0.95 / 1.01 / 1.14 GB in blocks of 256 / 512 / 1,024 queries (one layer alone: 114 / 176 / 310 MB above
# its inputs, against 1.13 GB), and the time per image did not differ measurably between them. Smaller blocks
# save less and less (the MLP's activations, 4,096 × 4,304 floats, are of the same size) for more nodes.
ATTENTION_BLOCK = 256


def build_vision_graph(ckpt: Checkpoint, spec: gemma3.Gemma3Spec, int8: bool = False, data_file: Any = None,
                       data_location: str | None = None, attention_block: int | None = ATTENTION_BLOCK
                       ) -> onnx.ModelProto:
    keys: dict[str, str] = {}
    for key in ckpt.entries:
        parts = gemma3.split_key(key, spec.architecture)
        if parts and parts[0] == "vision":
            keys["vision_model." + parts[1]] = key
        elif parts and parts[0] == "projector":
            keys["mm." + parts[1]] = key

    def get(name: str) -> np.ndarray:
        return ckpt.read_f32(keys[name])

    return vision_graph(get, spec, int8=int8, data_file=data_file, data_location=data_location,
                        attention_block=attention_block)


def vision_graph(get: Callable[[str], np.ndarray], spec: gemma3.Gemma3Spec, int8: bool = False,
                 data_file: Any = None, data_location: str | None = None,
                 attention_block: int | None = ATTENTION_BLOCK) -> onnx.ModelProto:
    """The graph from weights by name (`vision_model.<SigLIP key>`, `mm.<projector key>`): a checkpoint's,
    or random ones of a real shape (benchmarks). `attention_block=None` writes the formulation that holds every
    score of a layer at once (what vision.onnx files written before the blocks hold)."""
    v = spec.vision
    assert v is not None
    cfg = {"hidden_size": v.hidden, "patch_size": v.patch_size, "image_size": v.image_size,
           "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "layer_norm_eps": v.eps}
    gb = GraphBuilder("medgemma_vision", int8=int8, data_file=data_file, data_location=data_location,
                      attention_block=attention_block)
    hidden = siglip_vision_tower(gb, get, "vision_model", cfg)
    gb.output(gemma3_projector(gb, hidden, get, cfg, v.image_tokens), "image_embeds",
              ["batch", v.image_tokens, spec.text.hidden])
    return gb.model()


def write_vision_onnx(ckpt: Checkpoint, spec: gemma3.Gemma3Spec, dst: Path, data_dst: Path, preset: str) -> None:
    """Write the graph to `dst` and its weights to `data_dst` (both renamed into place together later; the
    graph refers to the data by its final name, vision.onnx.data).

    int8 is written quantized as the weights are read, in ONNX Runtime's dynamic-quantization pattern, and
    every weight goes straight to the data file: the 4B tower never sits in memory, neither as a 1.7 GB
    float32 graph (which quantize_dynamic would hold several times over) nor as a serialized protobuf."""
    with open(data_dst, "wb") as data:
        model = build_vision_graph(ckpt, spec, int8=preset == "int8", data_file=data, data_location="vision.onnx.data")
    # (onnx's checker would look for vision.onnx.data, which exists only once the folder is committed; the
    # graph's correctness is what the parity tests check)
    onnx.save_model(model, str(dst))
