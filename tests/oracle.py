"""Numerical helpers shared by the parity tests (llama.cpp logits, KL divergence)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def llama_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    """Logits at every position from llama.cpp, one batch."""
    from llama_cpp import _logger

    from medgemma_cli.llama_loader import load_llama

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
