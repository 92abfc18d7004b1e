"""Where external weights sit in the ONNX data files we write. ONNX Runtime maps them (at any offset on Linux
and macOS, and on Windows since 1.23), so a weight's offset is its address within a page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

CACHE_LINE = 64


def _external_offsets(graph: Path) -> dict[str, int]:
    m = onnx.load(str(graph), load_external_data=False)
    out = {}
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            out[t.name] = int({e.key: e.value for e in t.external_data}["offset"])
    return out


def test_vision_onnx_weights_start_on_cache_lines(convert_tiny):
    offsets = _external_offsets(convert_tiny("Q8_0") / "vision.onnx")
    assert offsets and not [n for n, o in offsets.items() if o % CACHE_LINE]


def test_external_weights_written_back_to_back_are_realigned(tmp_path):
    """onnx's saver writes external weights back to back: a 300-float tensor puts the next one 48 bytes into
    a cache line. The converter's final step moves them onto cache lines, and the graph computes the same."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from medgemma_cli.converters.siglip_convert import _realign_external_data

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(300, dtype=np.float32) for _ in range(2))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "a"], ["xa"]), helper.make_node("Add", ["xa", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [300])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [300])],
        [numpy_helper.from_array(a, "a"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.onnx.tmp-data", size_threshold=1024)
    assert sorted(_external_offsets(path).values()) == [0, 1200]  # as onnx wrote them
    _realign_external_data(path, tmp_path / "m.onnx.data", "m.onnx.data")
    assert sorted(_external_offsets(path).values()) == [0, 1216]
    assert not (tmp_path / "m.onnx.tmp-data").exists()
    x = rng.standard_normal(300, dtype=np.float32)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(y, x + a + b)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fp32", "int8"])
def test_siglip_external_weights_start_on_cache_lines(siglip_ckpt, tmp_path, monkeypatch, preset):
    """onnx's and ONNX Runtime's savers write external weights back to back; ours are realigned, and the
    graphs compute what the same graphs with their weights inside do."""
    from medgemma_cli.converters import siglip_convert
    from medgemma_cli.siglip import Siglip, resolve_siglip

    inline, external = tmp_path / "inline", tmp_path / "external"
    siglip_convert.convert_siglip(siglip_ckpt, inline, preset=preset, text_preset=preset)
    monkeypatch.setattr(siglip_convert, "_EXTERNAL_OVER", 0)
    siglip_convert.convert_siglip(siglip_ckpt, external, preset=preset, text_preset=preset)
    for graph in ("siglip-vision.onnx", "siglip-text.onnx"):
        offsets = _external_offsets(external / graph)
        assert offsets and not [n for n, o in offsets.items() if o % CACHE_LINE], graph
        assert not (external / (graph + ".data.partial")).exists()
    image = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    a, b = (Siglip(resolve_siglip(f), threads=1) for f in (external, inline))
    assert np.array_equal(a.embed_texts(["pleural effusion"]), b.embed_texts(["pleural effusion"]))
    assert np.array_equal(a.embed_images([image]), b.embed_images([image]))
