"""Every preset on a model whose rows are not whole K-quant blocks (Gemma 3 270M is 640 wide).

llama.cpp falls back to a type with smaller blocks for such rows; the one-pass converter must pick the same
types and write the same bytes as llama.cpp's own quantizer, for every preset, or it crashes (issue 15:
Q4_0 asked for Q6_K embeddings with rows of 640).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from medgemma_cli.conversion import convert
from medgemma_cli.kernels.policy import PRESETS
from medgemma_cli.synthetic import SHAPES, Shape, make_checkpoint
from oracle import assert_same_as_llama_quantize, gguf_tensors

Q = gguf.GGMLQuantizationType

# 640 wide like Gemma 3 270M; attn_output rows of 128 and ffn_down rows of 1152 are not 256 × n either.
W640 = Shape("w640", text={"vocab_size": 1024, "hidden_size": 640, "intermediate_size": 1152,
                           "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
                           "query_pre_attn_scalar": 64, "sliding_window": 16, "max_position_embeddings": 4096},
             vision=SHAPES["tiny"].vision, image_tokens=4, sp_pieces=1000)




@pytest.fixture(scope="module")
def wide640(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("w640")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SHAPES, "w640", W640)
        ckpt = make_checkpoint(root / "ckpt", "w640", architecture="Gemma3ForCausalLM", seed=640)
    lossless = convert(ckpt, root / "lossless", preset="F32").path / "text.gguf"
    return ckpt, lossless


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_falls_back_like_llama_quantize(wide640, preset, tmp_path):
    ckpt, lossless = wide640
    assert_same_as_llama_quantize(ckpt, lossless, preset, tmp_path)


def test_q4_0_embedding_falls_back_to_q8_0(wide640, tmp_path):
    """The case of the issue, spelled out: Q4_0 keeps its own type where rows allow, Q8_0 for the embedding."""
    ckpt, _ = wide640
    types = {k: v[0] for k, v in gguf_tensors(convert(ckpt, tmp_path / "q", preset="Q4_0").path / "text.gguf").items()}
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.ffn_up.weight"] == types["blk.0.attn_q.weight"] == "Q4_0"
