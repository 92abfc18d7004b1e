"""Quantized matmuls through ggml's CPU kernels, checked against numpy on the dequantized values."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from medgemma_cli.kernels import ggml
from medgemma_cli.kernels.matmul import matmul_throughput, mul_mat


def _q8_0_roundtrip(x: np.ndarray) -> np.ndarray:
    return ggml.dequantize(ggml.quantize(x, int(Q.Q8_0)), int(Q.Q8_0), x.size).reshape(x.shape)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
def test_mul_mat_matches_numpy(qtype):
    """ggml quantizes the activations to Q8_0 for these types: the reference does the same."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 256), dtype=np.float32)
    x = rng.standard_normal((5, 256), dtype=np.float32)
    qw = ggml.quantize(w, int(qtype))
    w_deq = ggml.dequantize(qw, int(qtype), w.size).reshape(w.shape)
    got, seconds = mul_mat(qw, qtype, 256, x, threads=2)
    ref = _q8_0_roundtrip(x) @ w_deq.T
    assert got.shape == (5, 96) and seconds > 0
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_f32_mul_mat_is_exact_enough():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 128), dtype=np.float32)
    x = rng.standard_normal((3, 128), dtype=np.float32)
    got, _ = mul_mat(w.view(np.uint8), Q.F32, 128, x, threads=1)
    np.testing.assert_allclose(got, x @ w.T, rtol=1e-5, atol=1e-4)


def test_wrong_weight_size_is_refused():
    with pytest.raises(ValueError, match="ggml expects"):
        mul_mat(np.zeros((4, 10), np.uint8), Q.Q8_0, 256, np.zeros((1, 256), np.float32))


def test_throughput_figures_are_consistent():
    f = matmul_throughput(Q.Q8_0, k=256, n=512, m=4, threads=1, repeats=2)
    assert f.seconds > 0
    assert f.gflops == pytest.approx(2 * 4 * 512 * 256 / f.seconds / 1e9)
    assert f.weight_gbps == pytest.approx(512 * ggml.row_size(int(Q.Q8_0), 256) / f.seconds / 1e9)
