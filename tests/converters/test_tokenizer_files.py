"""Tokenizer files as transformers 5 saves them (tokenizer.json and chat_template.jinja, no tokenizer.model), and
checkpoints whose tokenizer files contradict each other (issue 15)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from medgemma_cli.answering import AskOptions, ask
from medgemma_cli.conversion import convert
from medgemma_cli.converters.tokenizer import TokenType, read_vocabulary
from medgemma_cli.errors import InputError

TOKENIZER_FILES = {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja"}


@pytest.fixture(scope="module")
def tf5_tokenizer(hf_tokenizer, tmp_path_factory) -> Path:
    """What transformers 5's save_pretrained writes for the tiny checkpoint's tokenizer."""
    folder = tmp_path_factory.mktemp("tf5-tokenizer")
    hf_tokenizer.save_pretrained(folder)
    assert {p.name for p in folder.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    return folder


@pytest.fixture(scope="module")
def tf5_ckpt(tiny_ckpt, tf5_tokenizer, tmp_path_factory) -> Path:
    """The tiny checkpoint with its tokenizer files replaced by transformers 5's (weights shared by symlink)."""
    folder = tmp_path_factory.mktemp("tf5-ckpt") / "tiny-medgemma"
    folder.mkdir()
    for f in tiny_ckpt.iterdir():
        if f.suffix == ".safetensors":
            os.symlink(f, folder / f.name)
        elif f.name not in TOKENIZER_FILES:
            shutil.copy(f, folder / f.name)
    for f in tf5_tokenizer.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def _fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}


@pytest.mark.slow
def test_transformers5_checkpoint_converts_and_answers_like_transformers4(convert_tiny, tf5_ckpt, tmp_path):
    tf4_model = convert_tiny("Q8_0")
    tf5_model = convert(tf5_ckpt, tmp_path / "tf5", preset="Q8_0").path
    a, b = _fields(tf4_model / "text.gguf"), _fields(tf5_model / "text.gguf")
    for key in a:
        if key != "tokenizer.ggml.scores":
            assert a[key] == b[key], key
    types = np.array(a["tokenizer.ggml.token_type"])
    sa, sb = np.array(a["tokenizer.ggml.scores"]), np.array(b["tokenizer.ggml.scores"])
    normal = types == TokenType.NORMAL
    assert np.array_equal(sa[~normal], sb[~normal])  # added tokens, bytes, padding
    merged = np.flatnonzero(normal & (sb > sb[normal].min()))  # scores from merge ranks, in the same order
    assert np.array_equal(np.argsort(-sa[merged], kind="stable"), np.argsort(-sb[merged], kind="stable"))
    question = "history of diabetes hypertension smoking"  # the random tiny model answers it with words
    answers = [ask(question, [], model=m, options=AskOptions(max_tokens=12)) for m in (tf4_model, tf5_model)]
    assert answers[0].answer and answers[0].answer == answers[1].answer
    assert answers[0].tokens == answers[1].tokens


def test_transformers5_vocabulary_equals_transformers4(tiny_ckpt, tf5_tokenizer):
    old, new = read_vocabulary(tiny_ckpt, 1024), read_vocabulary(tf5_tokenizer, 1024)
    assert new.tokens == old.tokens and new.types == old.types
    assert (new.bos_id, new.eos_id, new.pad_id, new.unk_id, new.add_bos, new.add_eos) == \
        (old.bos_id, old.eos_id, old.pad_id, old.unk_id, old.add_bos, old.add_eos)
    assert new.chat_template == old.chat_template and new.special_ids == old.special_ids


def _with_json(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    edit(data)
    (dst / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return dst


def test_tokenizer_model_and_json_must_agree(tiny_ckpt, tf5_tokenizer, tmp_path):
    folder = tmp_path / "both"
    folder.mkdir()
    shutil.copy(tiny_ckpt / "tokenizer.model", folder)
    shutil.copy(tf5_tokenizer / "tokenizer.json", folder)
    shutil.copy(tf5_tokenizer / "tokenizer_config.json", folder)
    assert read_vocabulary(folder, 1024).tokens == read_vocabulary(tiny_ckpt, 1024).tokens

    def swap(data: dict) -> None:
        vocab = data["model"]["vocab"]
        a, b = "▁the", "▁of"
        vocab[a], vocab[b] = vocab[b], vocab[a]

    bad = _with_json(folder, tmp_path / "swapped", swap)
    with pytest.raises(InputError, match=r"tokenizer\.json: token \d+ is .* in tokenizer\.model"):
        read_vocabulary(bad, 1024)


def test_added_token_lists_must_agree(tiny_ckpt, tf5_tokenizer, tmp_path):
    def unspecial(data: dict) -> None:
        next(t for t in data["added_tokens"] if t["content"] == "<end_of_turn>")["special"] = False

    folder = _with_json(tf5_tokenizer, tmp_path / "tf5", unspecial)
    shutil.copy(tiny_ckpt / "tokenizer_config.json", folder)  # transformers 4's list says it is special
    with pytest.raises(InputError, match=r"added token \d+ is '<end_of_turn>' \(special=False\) "
                                         r"but .* \(special=True\) in tokenizer_config"):
        read_vocabulary(folder, 1024)


def test_types_follow_the_special_flags(tf5_tokenizer, tmp_path):
    """Not how a token looks: a non-special "<b>" is text, a special "[x]" is control; a user-defined token's
    "▁" is a space; an unmarked "<unused5>" is control as llama.cpp makes it."""

    def edit(data: dict) -> None:
        vocab = data["model"]["vocab"]
        by_id = {i: t for t, i in vocab.items()}
        for tid, text, special in ((500, "<b>", False), (501, "[x]", True), (502, "▁▁▁▁", False),
                                   (503, "<unused5>", False)):
            del vocab[by_id[tid]]
            vocab[text] = tid
            data["added_tokens"].append({"id": tid, "content": text, "special": special, "normalized": False,
                                         "lstrip": False, "rstrip": False, "single_word": False})

    v = read_vocabulary(_with_json(tf5_tokenizer, tmp_path / "t", edit), 1024)
    assert [(v.tokens[i], v.types[i], v.scores[i]) for i in (500, 501, 502, 503)] == [
        (b"<b>", TokenType.USER_DEFINED, -1000.0), (b"[x]", TokenType.CONTROL, -1000.0),
        (b"    ", TokenType.USER_DEFINED, -1000.0), (b"<unused5>", TokenType.CONTROL, -1000.0)]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"].update(type="Unigram"), "has no BPE model"),
    (lambda d: d["model"].update(byte_fallback=False), "no byte fallback"),
    (lambda d: d["model"]["vocab"].update({"<huge>": 10**9}), "outside the vocabulary"),
    (lambda d: d["model"]["merges"].append(["a", "b", "c"]), "malformed merge"),
    (lambda d: d["added_tokens"].append({"id": 5000, "content": "x"}), "outside the vocabulary"),
], ids=["not-bpe", "no-byte-fallback", "id-out-of-range", "bad-merge", "added-id-out-of-range"])
def test_malformed_tokenizer_json_is_refused(tf5_tokenizer, tmp_path, edit, message):
    with pytest.raises(InputError, match=message):
        read_vocabulary(_with_json(tf5_tokenizer, tmp_path / "bad", edit), 1024)


def test_no_tokenizer_at_all(tmp_path):
    with pytest.raises(InputError, match=re.escape("tokenizer.model: missing, and so is tokenizer.json")):
        read_vocabulary(tmp_path, 1024)
