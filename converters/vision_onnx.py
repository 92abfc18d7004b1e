"""MedGemma's vision tower + Gemma 3 projector as one ONNX graph (`vision.onnx`), for ONNX Runtime int8 on CPUs.

On a CPU-only workstation the image encoder is the wait: llama.cpp's mtmd spends most of the time to first
token in it, while ONNX Runtime's dynamic int8 kernels run the same SigLIP tower several times faster.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from medgemma_cli.converters import gemma3
from medgemma_cli.converters.checkpoint import Checkpoint
from medgemma_cli.converters.onnx_graph import GraphBuilder, gemma3_projector, siglip_vision_tower
from medgemma_cli.kernels.onnx_quant import quantize_onnx

VISION_ONNX_PRESETS = ("int8", "fp32", "none")


def build_vision_graph(ckpt: Checkpoint, spec: gemma3.Gemma3Spec) -> onnx.ModelProto:
    v = spec.vision
    assert v is not None
    keys: dict[str, str] = {}
    for key in ckpt.entries:
        parts = gemma3.split_key(key, spec.architecture)
        if parts and parts[0] == "vision":
            keys["vision_model." + parts[1]] = key
        elif parts and parts[0] == "projector":
            keys["mm." + parts[1]] = key

    def get(name: str) -> np.ndarray:
        return ckpt.read_f32(keys[name])

    cfg = {"hidden_size": v.hidden, "patch_size": v.patch_size, "image_size": v.image_size,
           "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "layer_norm_eps": v.eps}
    gb = GraphBuilder("medgemma_vision")
    hidden = siglip_vision_tower(gb, get, "vision_model", cfg)
    gb.output(gemma3_projector(gb, hidden, get, cfg, v.image_tokens), "image_embeds",
              ["batch", v.image_tokens, spec.text.hidden])
    return gb.model()


def write_vision_onnx(ckpt: Checkpoint, spec: gemma3.Gemma3Spec, dst: Path, data_dst: Path, scratch: Path,
                      preset: str) -> bool:
    """Write the graph to `dst` (weights in `data_dst`, renamed with it) — returns whether data_dst is used."""
    from medgemma_cli.converters.siglip_convert import _rename_external_data, _save

    model = build_vision_graph(ckpt, spec)
    final_data_name = "vision.onnx.data"
    if preset == "fp32":
        ext = _save(model, dst)
    else:
        ext = _save(model, scratch)
        del model
        quantize_onnx(scratch, dst, preset, external_data=ext)
    onnx.checker.check_model(str(dst))
    if ext:
        _rename_external_data(dst, data_dst, final_data_name)
    return ext
