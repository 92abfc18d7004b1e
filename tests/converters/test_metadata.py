"""What the converter writes besides tensors: tokenizer, hyper-parameters, projector keys, manifest."""

from __future__ import annotations

import hashlib
import json

import gguf
import pytest
import sentencepiece as spm

from medgemma_cli.converters.tokenizer import TokenType


@pytest.fixture(scope="module")
def text_fields(convert_tiny):
    r = gguf.GGUFReader(convert_tiny("Q8_0") / "text.gguf")
    return {k: f.contents() for k, f in r.fields.items()}


def test_tokenizer_is_complete(text_fields, tiny_ckpt):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_ckpt / "tokenizer.model"))
    tokens, types = text_fields["tokenizer.ggml.tokens"], text_fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 1024  # padded up to vocab_size
    for i in range(sp.GetPieceSize()):
        assert tokens[i] == sp.IdToPiece(i)
    assert tokens[1000] == "<image_soft_token>" and types[1000] == TokenType.CONTROL
    assert tokens[1023].startswith("[PAD") and types[1023] == TokenType.UNUSED
    for name in ("<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<bos>", "<eos>", "<pad>"):
        assert types[tokens.index(name)] == TokenType.CONTROL, name
    assert (text_fields["tokenizer.ggml.bos_token_id"], text_fields["tokenizer.ggml.eos_token_id"],
            text_fields["tokenizer.ggml.padding_token_id"],
            text_fields["tokenizer.ggml.unknown_token_id"]) == (2, 1, 0, 3)
    assert text_fields["tokenizer.ggml.add_bos_token"] is True
    assert text_fields["tokenizer.ggml.add_space_prefix"] is False
    assert text_fields["tokenizer.chat_template"] == (tiny_ckpt / "chat_template.jinja").read_text()


def test_hyperparameters(text_fields, tiny_ckpt):
    cfg = json.loads((tiny_ckpt / "config.json").read_text())["text_config"]
    assert text_fields["gemma3.block_count"] == cfg["num_hidden_layers"]
    assert text_fields["gemma3.embedding_length"] == cfg["hidden_size"]
    assert text_fields["gemma3.attention.sliding_window"] == cfg["sliding_window"]
    assert text_fields["gemma3.rope.freq_base"] == cfg["rope_theta"]
    assert text_fields["gemma3.rope.freq_base_swa"] == cfg["rope_local_base_freq"]
    assert text_fields["gemma3.rope.scaling.type"] == "linear"
    assert text_fields["gemma3.rope.scaling.factor"] == cfg["rope_scaling"]["factor"]
    assert text_fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_mmproj_keys_and_types(convert_tiny, tiny_ckpt):
    r = gguf.GGUFReader(convert_tiny("Q8_0", "Q8_0") / "mmproj.gguf")
    f = {k: v.contents() for k, v in r.fields.items()}
    vc = json.loads((tiny_ckpt / "config.json").read_text())["vision_config"]
    assert f["clip.projector_type"] == "gemma3" and f["clip.has_vision_encoder"] is True
    assert f["clip.vision.image_size"] == vc["image_size"] and f["clip.vision.patch_size"] == vc["patch_size"]
    assert f["clip.vision.projection_dim"] == 256 and f["general.type"] == "mmproj"
    assert "clip.vision.projector.scale_factor" not in f  # 8x8 patches pooled to 2x2 is the default 4
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in r.tensors}
    Q = gguf.GGMLQuantizationType
    assert types["mm.input_projection.weight"] == Q.F16
    assert types["v.patch_embd.weight"] == types["v.position_embd.weight"] == Q.F32
    assert types["v.blk.0.attn_q.weight"] == Q.Q8_0
    assert types["v.blk.0.ln1.weight"] == Q.F32


def test_manifest_describes_the_files(convert_tiny):
    folder = convert_tiny("Q8_0")
    m = json.loads((folder / "manifest.json").read_text())
    assert m["preset"] == "Q8_0" and m["source"]["architecture"] == "Gemma3ForConditionalGeneration"
    for name in ("text.gguf", "mmproj.gguf"):
        data = (folder / name).read_bytes()
        assert m["files"][name]["size"] == len(data)
        assert m["files"][name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert m["files"][name]["tensors"] == len(gguf.GGUFReader(folder / name).tensors)
    assert m["image_tokens"] == 4 and m["image_size"] == 32
