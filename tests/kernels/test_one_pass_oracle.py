"""One-pass quantization against llama.cpp's quantizer run over our own lossless GGUF: same types, same bytes.

Shape-only checkpoints with 34 and 62 layers (tiny widths) exercise every layer-position rule of the presets.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from medgemma_cli.conversion import convert
from medgemma_cli.kernels.imatrix import read_imatrix
from medgemma_cli.kernels.llama_quantize import llama_quantize
from medgemma_cli.kernels.policy import PRESETS
from medgemma_cli.synthetic import make_checkpoint
from oracle import assert_same_as_llama_quantize, gguf_tensors

pytestmark = pytest.mark.slow




@pytest.fixture(scope="module", params=[(6, "float32"), (34, "bfloat16"), (62, "float32")],
                ids=["tiny-6-f32", "34-layers-bf16", "62-layers-f32"])
def checkpoint(request, tmp_path_factory):
    layers, dtype = request.param
    root = tmp_path_factory.mktemp(f"oracle-{layers}")
    ckpt = make_checkpoint(root / "ckpt", "tiny", architecture="Gemma3ForCausalLM", dtype=dtype, layers=layers,
                           seed=layers)
    lossless = convert(ckpt, root / "lossless", preset="BF16" if dtype == "bfloat16" else "F32").path / "text.gguf"
    return ckpt, lossless, root


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0"])
def test_one_pass_equals_llama_quantize(checkpoint, preset, tmp_path):
    ckpt, lossless, _ = checkpoint
    assert_same_as_llama_quantize(ckpt, lossless, preset, tmp_path)


def _write_legacy_imatrix(path: Path, values: dict[str, np.ndarray], ncall: int) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(values)))
        for name, v in values.items():
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, v.size))
            f.write((v * ncall).astype("<f4").tobytes())
        f.write(struct.pack("<i", 10) + struct.pack("<i", 4) + b"test")


def _write_gguf_imatrix(path: Path, values: dict[str, np.ndarray], count: float) -> None:
    w = gguf.GGUFWriter(path, "imatrix")
    w.add_string("general.type", "imatrix")
    for name, v in values.items():
        w.add_tensor(name + ".in_sum2", (v * count).astype(np.float32).reshape(1, -1))
        w.add_tensor(name + ".counts", np.array([[count]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("fmt", ["legacy", "gguf"])
def test_imatrix_is_read_and_used_like_llama_quantize(checkpoint, tmp_path, fmt):
    ckpt, lossless, _ = checkpoint
    rng = np.random.default_rng(0)
    names = [t.name for t in gguf.GGUFReader(lossless).tensors if t.name.startswith("blk.") and "norm" not in t.name]
    sizes = {t.name: int(t.shape[0]) for t in gguf.GGUFReader(lossless).tensors}
    values = {n: rng.uniform(0.1, 5.0, sizes[n]).astype(np.float32) for n in names}
    path = tmp_path / f"imatrix.{'dat' if fmt == 'legacy' else 'gguf'}"
    (_write_legacy_imatrix if fmt == "legacy" else _write_gguf_imatrix)(path, values, 8)
    loaded = read_imatrix(path)
    assert set(loaded) == set(values)
    for n in names:
        np.testing.assert_allclose(loaded[n], values[n], rtol=1e-6)

    ours = convert(ckpt, tmp_path / "ours", preset="Q4_K_M", imatrix=path)
    assert ours.manifest["imatrix"]["tensors"] == len(names)
    ref = tmp_path / "ref.gguf"
    llama_quantize(lossless, ref, PRESETS["Q4_K_M"].file_type, threads=2, imatrix=loaded)
    a, b = gguf_tensors(ours.path / "text.gguf"), gguf_tensors(ref)
    assert a == b
    plain = gguf_tensors(convert(ckpt, tmp_path / "plain", preset="Q4_K_M").path / "text.gguf")
    assert plain["blk.0.attn_q.weight"] != a["blk.0.attn_q.weight"]  # the imatrix did change the result


def test_quantization_report(checkpoint, tmp_path):
    ckpt, _, _ = checkpoint
    m = convert(ckpt, tmp_path / "q", preset="Q4_K_M").manifest
    classes = m["quantization"]["classes"]
    assert classes["attn_norm"]["rel_rms"] == 0
    assert classes["attn_norm"]["types"] == {"F32": len(classes) and classes["attn_norm"]["types"]["F32"]}
    assert 0.01 < classes["ffn_up"]["rel_rms"] < 0.15  # Q4_K on random weights
    assert classes["token_embd"]["types"] == {"Q6_K": 1}
    assert classes["token_embd"]["rel_rms"] < classes["ffn_up"]["rel_rms"]
    assert set(classes["attn_v"]["types"]) == {"Q4_K", "Q6_K"}
    assert len(m["quantization"]["tensors"]) == m["files"]["text.gguf"]["tensors"]
