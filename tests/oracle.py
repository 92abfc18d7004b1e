"""Helpers shared by the parity tests: llama.cpp logits, KL divergence, and our GGUF against llama-quantize's."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def llama_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    """Logits at every position from llama.cpp, one batch."""
    from llama_cpp import _logger

    from medgemma_cli.llama.loader import load_llama

    _logger.set_verbose(False)
    llm = load_llama(gguf_path, n_ctx=512, n_batch=512, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def kl_per_position(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    p, q = log_softmax(ref.astype(np.float64)), log_softmax(got.astype(np.float64))
    return (np.exp(p) * (p - q)).sum(-1)


def gguf_tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    """Every tensor of a GGUF as (type name, data bytes), by name."""
    import gguf

    return {t.name: (gguf.GGMLQuantizationType(t.tensor_type).name, np.asarray(t.data).tobytes())
            for t in gguf.GGUFReader(path).tensors}


def assert_same_as_llama_quantize(ckpt: Path, lossless: Path, preset: str, work: Path) -> None:
    """Our one-pass conversion of `ckpt` equals llama.cpp's `llama_model_quantize` of its lossless GGUF:
    the same type and the same bytes, tensor by tensor."""
    from medgemma_cli.conversion import convert
    from medgemma_cli.kernels.llama_quantize import llama_quantize
    from medgemma_cli.kernels.policy import PRESETS

    ours = convert(ckpt, work / "ours", preset=preset).path / "text.gguf"
    ref = work / "ref.gguf"
    llama_quantize(lossless, ref, PRESETS[preset].file_type, threads=2)
    a, b = gguf_tensors(ours), gguf_tensors(ref)
    assert {k: v[0] for k, v in a.items()} == {k: v[0] for k, v in b.items()}  # same types, tensor by tensor
    differing = [k for k in a if a[k][1] != b[k][1]]
    assert not differing, differing[:5]
