"""Fast images on CPU: MedGemma's vision tower on ONNX Runtime, image reuse across questions, `chat`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medgemma_cli.errors import MedgemmaError
from medgemma_cli.inputs.collect import collect
from medgemma_cli.llama.engine import Engine, Timings
from medgemma_cli.llama.model_files import resolve_model
from medgemma_cli.llama.onnx_vision import OnnxVision
from medgemma_cli.prompt import build_messages

pytestmark = pytest.mark.slow
CT = Path(get_testdata_file("CT_small.dcm", download=False))
EMRI = Path(get_testdata_file("emri_small.dcm", download=False))


def _hf_features(model, rgb: np.ndarray) -> np.ndarray:
    import torch

    px = (torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        out = model.get_image_features(pixel_values=px)
    out = getattr(out, "pooler_output", out)
    return (out[0] if isinstance(out, (list, tuple)) else out).reshape(-1, model.config.text_config.hidden_size).numpy()


@pytest.mark.parametrize("preset, bound", [("fp32", 0.99999), ("int8", 0.999)])
def test_onnx_image_embeddings_match_transformers(convert_tiny, hf_tiny, preset, bound):
    folder = convert_tiny("F32", "F32", preset)
    enc = OnnxVision(folder / "vision.onnx", threads=2)
    rng = np.random.default_rng(5)
    for rgb in (rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), collect([CT], 32).images[0].rgb):
        got, ref = enc.encode(rgb), _hf_features(hf_tiny, rgb)
        assert got.shape == ref.shape == (4, 256)
        cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
        assert cos >= bound, cos


def test_logits_after_the_image_onnx_versus_mtmd(convert_tiny):
    files = resolve_model(convert_tiny("F32", "F32", "fp32"))
    inputs = collect([CT], 32)
    logits = {}
    for backend in ("mtmd", "onnx"):
        engine = Engine(files, n_ctx=256, vision_backend=backend)
        assert engine.vision_backend == backend
        chunks = engine.chunks(engine.render(build_messages("What is shown?", inputs)), [i.rgb for i in inputs.images])
        engine.prefill(chunks, Timings())
        n_vocab = engine._lib.llama_vocab_n_tokens(engine.vocab)
        logits[backend] = np.ctypeslib.as_array(engine._lib.llama_get_logits_ith(engine.ctx, -1),
                                                shape=(n_vocab,)).copy()
        chunks.free()
        engine.close()
    assert np.abs(logits["onnx"] - logits["mtmd"]).max() <= 1e-2


def test_backend_choice(convert_tiny):
    with_onnx = resolve_model(convert_tiny("Q8_0"))
    e = Engine(with_onnx, n_ctx=128, gpu_layers=0)
    assert e.vision_backend == "onnx"  # auto on a CPU-only run
    e.close()
    e = Engine(with_onnx, n_ctx=128, vision_backend="mtmd")
    assert e.vision_backend == "mtmd"
    e.close()
    without = resolve_model(convert_tiny("Q8_0", "F16", "none"))
    assert without.vision_onnx is None
    e = Engine(without, n_ctx=128)
    assert e.vision_backend == "mtmd"
    e.close()
    with pytest.raises(MedgemmaError, match=re.escape("no vision.onnx")):
        Engine(without, n_ctx=128, vision_backend="onnx")


