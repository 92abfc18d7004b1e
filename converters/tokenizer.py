"""The Gemma 3 SentencePiece vocabulary as llama.cpp's `llama` (SPM) tokenizer wants it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from medgemma_cli.converters.checkpoint import read_json
from medgemma_cli.errors import InputError


class TokenType(IntEnum):
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass
class Vocabulary:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    special_ids: list[int] = field(default_factory=list)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def read_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    as_json = folder / "chat_template.json"
    if as_json.is_file():
        tmpl = read_json(as_json).get("chat_template")
        if isinstance(tmpl, str):
            return tmpl
    tmpl = tokenizer_config.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    return tmpl if isinstance(tmpl, str) else None


def read_vocabulary(folder: Path, vocab_size: int) -> Vocabulary:
    """Tokens, scores and types padded to the embedding's row count, with explicit special ids.

    The special ids are written explicitly because llama.cpp's SPM defaults (bos 1, eos 2) are Gemma's
    eos and bos swapped — a silent and total failure.
    """
    from sentencepiece import SentencePieceProcessor

    model_path = folder / "tokenizer.model"
    if not model_path.is_file():
        raise InputError(model_path, "missing (Gemma 3 checkpoints ship their SentencePiece model as tokenizer.model)")
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_path.read_bytes())
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
        raise InputError(model_path, "not a valid SentencePiece model") from e
    n_sp = sp.GetPieceSize()
    if n_sp > vocab_size:
        raise InputError(model_path, f"has {n_sp} pieces but config.json's vocab_size is {vocab_size}")

    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i in range(n_sp):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = TokenType.UNKNOWN
        elif sp.IsControl(i):
            types[i] = TokenType.CONTROL
        elif sp.IsUnused(i):
            types[i] = TokenType.UNUSED
        elif sp.IsByte(i):
            types[i] = TokenType.BYTE
        else:
            types[i] = TokenType.NORMAL

    added_path = folder / "added_tokens.json"
    for text, tid in read_json(added_path, required=False).items():
        tid = int(tid)
        if not 0 <= tid < vocab_size:
            raise InputError(added_path, f"token {text!r} has id {tid}, outside the vocabulary of {vocab_size}")
        tokens[tid] = text.encode("utf-8")
        scores[tid] = -1000.0
        types[tid] = TokenType.USER_DEFINED

    config_path = folder / "tokenizer_config.json"
    tok_cfg = read_json(config_path, required=False)
    decoder = tok_cfg.get("added_tokens_decoder") or {}
    for tid_s, data in decoder.items():
        tid = int(tid_s)
        if not 0 <= tid < vocab_size:
            raise InputError(config_path, f"added token id {tid} is outside the vocabulary of {vocab_size}")
        text = data["content"]
        tokens[tid] = text.encode("utf-8")
        if data.get("special") or (text.startswith("<") and text.endswith(">")):
            types[tid] = TokenType.CONTROL
        else:
            types[tid] = TokenType.USER_DEFINED

    special_map = read_json(folder / "special_tokens_map.json", required=False)
    by_text = {t: i for i, t in enumerate(tokens)}

    def special(kind: str, fallback: int) -> int:
        text = _token_text(tok_cfg.get(f"{kind}_token")) or _token_text(special_map.get(f"{kind}_token"))
        if text is None:
            if fallback < 0:
                raise InputError(config_path, f"no {kind} token is defined")
            return fallback
        tid = by_text.get(text.encode("utf-8"))
        if tid is None:
            raise InputError(config_path, f"{kind}_token {text!r} is not in the vocabulary")
        return tid

    vocab = Vocabulary(
        tokens=tokens,
        scores=scores,
        types=[int(t) for t in types],
        bos_id=special("bos", sp.bos_id()),
        eos_id=special("eos", sp.eos_id()),
        pad_id=special("pad", sp.pad_id()),
        unk_id=special("unk", sp.unk_id()),
        add_bos=bool(tok_cfg.get("add_bos_token", True)),
        add_eos=bool(tok_cfg.get("add_eos_token", False)),
        chat_template=read_chat_template(folder, tok_cfg),
    )
    for tid in (vocab.bos_id, vocab.eos_id, vocab.pad_id):
        vocab.types[tid] = TokenType.CONTROL
    vocab.special_ids = [i for i, t in enumerate(vocab.types) if t == TokenType.CONTROL]
    return vocab


def write_vocabulary(w: Any, vocab: Vocabulary) -> None:
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_pad_token_id(vocab.pad_id)
    w.add_unk_token_id(vocab.unk_id)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    w.add_add_space_prefix(False)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
