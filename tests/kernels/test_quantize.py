"""ggml's kernels through our bindings, and the per-tensor type policy, against llama.cpp's own quantizer."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from medgemma_cli.kernels import ggml
from medgemma_cli.kernels.llama_quantize import llama_quantize
from medgemma_cli.kernels.policy import PRESETS, mmproj_tensor_type, more_bits, text_tensor_type


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_thread_count_does_not_change_bytes(qtype):
    x = np.random.default_rng(0).standard_normal((37, 512)).astype(np.float32)
    one = ggml.quantize(x, qtype, threads=1)
    assert one.shape == (37, ggml.row_size(qtype, 512))
    assert np.array_equal(one, ggml.quantize(x, qtype, threads=2))
    assert np.array_equal(one, ggml.quantize(x, qtype, threads=5))


@pytest.mark.parametrize("qtype, tol", [(Q.Q8_0, 0.01), (Q.Q6_K, 0.02), (Q.Q4_K, 0.12)])
def test_dequantized_error_is_small(qtype, tol):
    x = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    back = gguf.quants.dequantize(ggml.quantize(x, qtype), qtype)
    assert np.sqrt(np.mean((back - x) ** 2)) / np.sqrt(np.mean(x**2)) < tol


def test_q8_0_matches_gguf_py_reference():
    x = np.random.default_rng(2).standard_normal((8, 96)).astype(np.float32)
    assert np.array_equal(ggml.quantize(x, Q.Q8_0), gguf.quants.quantize(x, Q.Q8_0))


def test_rows_not_whole_blocks_are_refused():
    with pytest.raises(ValueError, match="not whole blocks"):
        ggml.quantize(np.zeros((2, 100), np.float32), Q.Q4_K)


def test_policy_rules():
    q4 = PRESETS["Q4_K_M"]
    assert text_tensor_type(q4, "blk.3.attn_norm.weight", (2560,), 3, 34) == Q.F32
    assert text_tensor_type(q4, "token_embd.weight", (262208, 2560), None, 34) == Q.Q6_K  # tied output
    assert text_tensor_type(q4, "blk.0.attn_v.weight", (1024, 2560), 0, 34) == Q.Q6_K  # first eighth
    assert text_tensor_type(q4, "blk.5.attn_v.weight", (1024, 2560), 5, 34) == Q.Q4_K
    assert text_tensor_type(q4, "blk.33.ffn_down.weight", (2560, 10240), 33, 34) == Q.Q6_K  # last eighth
    assert text_tensor_type(q4, "blk.5.ffn_up.weight", (10240, 2560), 5, 34) == Q.Q4_K
    assert text_tensor_type(q4, "blk.5.ffn_up.weight", (10240, 2592), 5, 34) == Q.Q5_0  # rows not 256-blocks
    assert text_tensor_type(PRESETS["Q8_0"], "token_embd.weight", (1024, 256), None, 6) == Q.Q8_0
    assert text_tensor_type(PRESETS["Q8_0"], "blk.0.ffn_up.weight", (100, 100), 0, 6) == Q.F16  # 100 % 32
    # i < 34//8, i >= 7*34//8, or (i - 4) % 3 == 2
    assert [i for i in range(34) if more_bits(i, 34)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29, 30, 31, 32, 33]
    assert mmproj_tensor_type(Q.Q8_0, "v.blk.0.ffn_down.weight", (1152, 4304)) == Q.F16  # 4304 % 32 != 0
    assert mmproj_tensor_type(Q.Q8_0, "mm.input_projection.weight", (1152, 2560)) == Q.F16
    assert mmproj_tensor_type(Q.Q8_0, "v.patch_embd.weight", (1152, 3, 14, 14)) == Q.F32
    assert mmproj_tensor_type(Q.F32, "mm.input_projection.weight", (1152, 2560)) == Q.F32


def _tensors(path: Path) -> dict[str, tuple[int, bytes]]:
    return {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def test_direct_q8_0_is_byte_identical_to_llama_quantize(convert_tiny, tmp_path):
    """Our one-pass Q8_0 file equals llama.cpp's quantizer run over our F32 file, tensor for tensor."""
    ref = tmp_path / "ref-q8_0.gguf"
    llama_quantize(convert_tiny("F32") / "text.gguf", ref, gguf.LlamaFileType.MOSTLY_Q8_0, threads=2)
    assert _tensors(convert_tiny("Q8_0") / "text.gguf") == _tensors(ref)


def test_read_gguf_info_agrees_with_gguf_py(convert_tiny):
    path = convert_tiny("Q4_K_M") / "text.gguf"
    ours = ggml.read_gguf_info(path)
    theirs = gguf.GGUFReader(path)
    assert [(t.name, t.type, t.offset, t.size) for t in ours.tensors] == \
        [(t.name, int(t.tensor_type), int(t.data_offset), int(t.n_bytes)) for t in theirs.tensors]
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        want, got = field.contents(), ours.get(key)
        got = got.tolist() if isinstance(got, np.ndarray) else got
        if isinstance(want, float):
            assert got == pytest.approx(want), key
        else:
            assert got == want, key


def test_untested_ggml_is_refused_clearly(monkeypatch):
    from medgemma_cli.kernels.ggml import TESTED_LLAMA_CPP_PYTHON, GgmlLibraryError, check_version

    check_version(TESTED_LLAMA_CPP_PYTHON)  # the tested one passes
    monkeypatch.delenv("MEDGEMMA_ALLOW_UNTESTED_GGML", raising=False)
    with pytest.raises(GgmlLibraryError,
                       match=r"llama-cpp-python 0\.9\.0 is installed.*pip install llama-cpp-python=="):
        check_version("0.9.0")
    monkeypatch.setenv("MEDGEMMA_ALLOW_UNTESTED_GGML", "1")
    check_version("0.9.0")  # the user's explicit choice
