"""The vision projector through libmtmd against transformers' get_image_features."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


def _hf_image_features(model, rgb: np.ndarray) -> np.ndarray:
    import torch

    px = torch.tensor(rgb, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
    px = (px - 0.5) / 0.5  # the processor's rescale + normalise (mean = std = 0.5)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=px)
    out = getattr(out, "pooler_output", out)
    return (out[0] if isinstance(out, (list, tuple)) else out).reshape(-1, model.config.text_config.hidden_size).numpy()


@pytest.mark.parametrize("mmproj", ["F32", "F16"])
def test_image_embeddings_match_transformers(convert_tiny, hf_tiny, mmproj):
    from medgemma_cli.llama.loader import load_llama
    from medgemma_cli.llama.mtmd import MtmdContext

    folder = convert_tiny("F32", mmproj)
    llm = load_llama(folder / "text.gguf", n_ctx=128, verbose=False)
    size = hf_tiny.config.vision_config.image_size
    rng = np.random.default_rng(7)
    # a smooth image and a noisy one, square at the model's input size (mtmd must not resize it)
    yy, xx = np.mgrid[0:size, 0:size]
    smooth = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], -1).astype(np.uint8)
    noisy = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    with MtmdContext(llm, folder / "mmproj.gguf", threads=2) as enc:
        for rgb in (smooth, noisy):
            got = enc.encode_image(rgb)
            ref = _hf_image_features(hf_tiny, rgb)
            assert got.shape == ref.shape == (4, 256)
            cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
            assert cos >= 0.99999, cos
