"""vision.onnx's attention in query blocks (issue #18): no tensor of a layer's whole scores at 896 px, and the
same embeddings as the whole formulation and as transformers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from medgemma_cli.converters.onnx_graph import GraphBuilder
from medgemma_cli.converters.vision_onnx import ATTENTION_BLOCK, vision_graph
from medgemma_cli.synthetic import vision_weights


def _value_shapes(model: onnx.ModelProto) -> list[tuple]:
    """Every intermediate value's shape as ONNX shape inference derives it (symbolic batch included)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return [tuple(d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim)
            for vi in inferred.graph.value_info]


def _embeddings(model: onnx.ModelProto, pixels: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": pixels})[0]


@pytest.mark.parametrize("int8", [False, True])
def test_no_tensor_holds_a_layers_whole_scores_at_896_px(int8):
    """The 4B shape's 4,096 patches and 16 heads, one layer 64 wide (cheap): whole, a layer's scores are
    16 × 4096 × 4096 floats (1 GiB); in blocks, no value is larger than one block's scores."""
    spec, get = vision_weights("4b", num_hidden_layers=1, hidden_size=64, intermediate_size=128)
    whole = _value_shapes(vision_graph(get, spec, int8=int8, attention_block=None))
    assert ("batch", 16, 4096, 4096) in whole  # what the check below would catch
    blocked = _value_shapes(vision_graph(get, spec, int8=int8))
    assert not [s for s in blocked if s[-2:] == (4096, 4096)]
    head_dim = 64 // 16
    scores = [s for s in blocked if len(s) == 4 and s[-1] == 4096 and s[2] != head_dim]  # not the transposed keys
    assert scores and set(scores) == {("batch", 16, ATTENTION_BLOCK, 4096)}
    largest = max(int(np.prod([d for d in s if isinstance(d, int)])) for s in blocked)
    assert largest == 16 * ATTENTION_BLOCK * 4096


@pytest.mark.parametrize("int8", [False, True])
def test_blocks_compute_what_the_whole_attention_does(int8):
    """256 patches in blocks of 100, 100 and 56 (a remainder included), two layers, batch of two images."""
    spec, get = vision_weights("4b", num_hidden_layers=2, hidden_size=64, intermediate_size=128, image_size=224,
                               image_tokens=16)
    pixels = np.random.default_rng(3).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    blocked = vision_graph(get, spec, int8=int8, attention_block=100)
    splits = [n for n in blocked.graph.node if n.op_type == "Split"]
    assert len(splits) == 2 and len(splits[0].output) == 3
    want = _embeddings(vision_graph(get, spec, int8=int8, attention_block=None), pixels)
    got = _embeddings(blocked, pixels)
    assert got.shape == want.shape == (2, 16, spec.text.hidden)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_short_sequences_keep_the_whole_formulation():
    """At most one block of queries (the tiny shape's 64 patches, text towers): no Split, the graph as before."""
    spec, get = vision_weights("tiny")
    ops = {n.op_type for n in vision_graph(get, spec).graph.node}
    assert "Softmax" in ops and "Split" not in ops
    whole = vision_graph(get, spec, attention_block=None)
    assert vision_graph(get, spec).SerializeToString() == whole.SerializeToString()


def test_a_block_must_hold_a_query():
    with pytest.raises(ValueError, match="attention_block"):
        GraphBuilder("g", attention_block=0)


@pytest.mark.slow
def test_blocked_graph_matches_transformers(tiny_ckpt, hf_tiny):
    """The converter's graph of the tiny checkpoint in blocks of 24 queries (64 patches: 24, 24, 16) against
    transformers + torch, at the fp32 parity test's bound."""
    import torch

    from medgemma_cli.converters import gemma3
    from medgemma_cli.converters.checkpoint import Checkpoint
    from medgemma_cli.converters.vision_onnx import build_vision_graph

    ckpt = Checkpoint(tiny_ckpt)
    spec = gemma3.read_spec(ckpt.config, ckpt.processor_config, ckpt.config_path)
    model = build_vision_graph(ckpt, spec, attention_block=24)
    assert [len(n.output) for n in model.graph.node if n.op_type == "Split"] == [3] * spec.vision.layers
    pixels = np.random.default_rng(5).uniform(-1, 1, (1, 3, 32, 32)).astype(np.float32)
    got = _embeddings(model, pixels).reshape(-1)
    with torch.no_grad():
        ref = hf_tiny.get_image_features(pixel_values=torch.tensor(pixels))
    ref = getattr(ref, "pooler_output", ref)
    ref = (ref[0] if isinstance(ref, (list, tuple)) else ref).numpy().reshape(-1)
    cos = float(got @ ref / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos >= 0.99999, cos
