"""The Gemma 3 vocabulary as llama.cpp's `llama` (SentencePiece) tokenizer wants it.

Read from the checkpoint's own tokenizer definitions, never guessed from how a token looks: the pieces and
their SentencePiece types from `tokenizer.model`, or the vocabulary and merges from `tokenizer.json` (all that
transformers 5 saves); the added tokens and their `special` flags from `tokenizer.json`, `tokenizer_config.json`
and `added_tokens.json`. From tokenizer.model the result is what llama.cpp's own Gemma conversion writes, entry
for entry; from tokenizer.json alone it differs only in the scores of merged pieces, which keep their order.
"""

from __future__ import annotations

import re
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


# What llama.cpp's converter writes for tokens that are not SentencePiece pieces: added tokens are never reached
# by merging, padding rows are never tokens at all.
ADDED_SCORE = -1000.0
PAD_SCORE = -10000.0
# Gemma's tokenizer.json is 33 MB and its tokenizer.model 4.5 MB: anything far larger is not a tokenizer.
MAX_TOKENIZER_BYTES = 512 << 20
SPACE_MARK = "\u2581"  # SentencePiece's visible space, "▁"
# Defaults of transformers' GemmaTokenizer, used when the configs name no such token.
GEMMA_SPECIALS = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>"}
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


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


@dataclass
class _Pieces:
    """The base vocabulary (before added tokens), index = token id."""

    texts: list[str]
    scores: list[float]
    types: list[int]
    source: Path
    own_ids: dict[str, int] = field(default_factory=dict)  # the special ids the file itself names


@dataclass(frozen=True)
class _Added:
    content: str
    special: bool
    source: Path


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


def looks_special(text: str) -> bool:
    """Added tokens that older Gemma tokenizers leave unmarked but that are never text. llama.cpp's converter
    makes them CONTROL too (so that they are not printed), and we write what it writes."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<unused") and text.endswith(">"))
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>")))


def _check_size(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_TOKENIZER_BYTES:
        raise InputError(path, f"is {size} bytes; no tokenizer is larger than {MAX_TOKENIZER_BYTES >> 20} MiB")


def _spm_pieces(path: Path, vocab_size: int) -> _Pieces:
    from sentencepiece import SentencePieceProcessor

    _check_size(path)
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(path.read_bytes())
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
        raise InputError(path, "not a valid SentencePiece model") from e
    n = sp.GetPieceSize()
    if n > vocab_size:
        raise InputError(path, f"has {n} pieces but config.json's vocab_size is {vocab_size}")
    texts, scores, types = [], [], []
    for i in range(n):
        texts.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        if sp.IsUnknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.IsControl(i):
            types.append(TokenType.CONTROL)
        elif sp.IsUnused(i):
            types.append(TokenType.UNUSED)
        elif sp.IsByte(i):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    own = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
    return _Pieces(texts, scores, [int(t) for t in types], path, {k: v for k, v in own.items() if v >= 0})


def read_tokenizer_json(path: Path) -> dict[str, Any]:
    _check_size(path)
    data = read_json(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise InputError(path, "has no BPE model (Gemma 3's tokenizer is BPE with byte fallback)")
    if not model.get("byte_fallback"):
        raise InputError(path, "its BPE model has no byte fallback, which Gemma 3's tokenizer and llama.cpp's "
                               "SentencePiece tokenizer both use")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges", []), list):
        raise InputError(path, "model.vocab must be an object and model.merges a list")
    if not isinstance(data.get("added_tokens", []), list):
        raise InputError(path, "added_tokens must be a list")
    return data


def _merge_pair(merge: Any, path: Path) -> tuple[str, str]:
    if isinstance(merge, str):  # the older "left right" form; pieces never hold a plain space (it is "▁")
        parts = merge.split(" ")
    else:
        parts = merge
    if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
        raise InputError(path, f"malformed merge {str(merge)[:40]!r}")
    return parts[0], parts[1]


def _json_pieces(data: dict[str, Any], path: Path, vocab_size: int) -> _Pieces:
    """The BPE vocabulary as SentencePiece pieces. llama.cpp's SentencePiece tokenizer merges the adjacent pair
    whose result scores highest; BPE merges the pair of lowest rank. A piece's score is therefore minus the rank of
    the first merge that makes it. (Converted from SentencePiece, as Gemma's is, tokenizer.json lists every split
    of a piece as a merge, ranked by the piece's original score, so pairs and results rank alike; the original
    scores themselves are not in the file.)"""
    model = data["model"]
    by_id: dict[int, str] = {}
    for text, tid in model["vocab"].items():
        if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid < vocab_size:
            raise InputError(path, f"token {text[:40]!r} has id {tid!r}, outside the vocabulary of {vocab_size}")
        # transformers' Gemma converter aliases a missing "\t" to <0x09>'s id; the byte piece is the real one
        if tid not in by_id or _BYTE_PIECE.fullmatch(text):
            by_id[tid] = text
    n = max(by_id, default=-1) + 1
    texts = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    ids = {t: i for i, t in enumerate(texts)}
    unmerged = -float(len(model.get("merges", [])))  # below every merge: such pieces are single characters
    scores = [unmerged] * n
    made: set[int] = set()
    for rank, merge in enumerate(model.get("merges", [])):
        left, right = _merge_pair(merge, path)
        tid = ids.get(left + right)
        if tid is not None and tid not in made:
            made.add(tid)
            scores[tid] = -float(rank)
    unk = model.get("unk_token")
    types = []
    for i, text in enumerate(texts):
        if i not in by_id:
            types.append(int(TokenType.UNUSED))
            scores[i] = PAD_SCORE
        elif text == unk:
            types.append(int(TokenType.UNKNOWN))
        elif _BYTE_PIECE.fullmatch(text):
            types.append(int(TokenType.BYTE))
            scores[i] = 0.0  # as SentencePiece scores byte pieces
        else:
            types.append(int(TokenType.NORMAL))
    own = {"unk": ids[unk]} if unk in ids else {}
    return _Pieces(texts, scores, types, path, own)


def _check_agreement(spm: _Pieces, data: dict[str, Any], json_path: Path) -> None:
    """Both files define the same vocabulary, or the checkpoint is inconsistent and we refuse to guess."""
    for text, tid in data["model"]["vocab"].items():
        if not isinstance(tid, int) or not 0 <= tid < len(spm.texts):
            raise InputError(json_path, f"token {text[:40]!r} has id {tid!r}, which {spm.source.name} does not have")
        piece = spm.texts[tid]
        if piece != text and not (text == "\t" and piece == "<0x09>"):
            raise InputError(json_path, f"token {tid} is {text[:40]!r} but {piece[:40]!r} in {spm.source.name}: "
                                        "the two tokenizer files disagree")


def _added_tokens(folder: Path, data: dict[str, Any] | None, tok_cfg: dict[str, Any],
                  vocab_size: int) -> dict[int, _Added]:
    """Added tokens by id. tokenizer.json (what transformers loads) and tokenizer_config.json's
    added_tokens_decoder must agree where both list a token; added_tokens.json only names ids."""
    added: dict[int, _Added] = {}
    path = folder / "added_tokens.json"
    for text, tid in read_json(path, required=False).items():
        if not isinstance(tid, int) or not 0 <= tid < vocab_size:
            raise InputError(path, f"token {text[:40]!r} has id {tid!r}, outside the vocabulary of {vocab_size}")
        added[tid] = _Added(text, False, path)

    listed: list[tuple[Any, Any, Path]] = []
    path = folder / "tokenizer_config.json"
    decoder = tok_cfg.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise InputError(path, "added_tokens_decoder must be an object")
    for tid_s, entry in decoder.items():
        try:
            tid = int(tid_s)
        except ValueError:
            raise InputError(path, f"added token id {str(tid_s)[:20]!r} is not a number") from None
        listed.append((tid, entry, path))
    if data is not None:
        path = folder / "tokenizer.json"
        listed += [(entry.get("id") if isinstance(entry, dict) else None, entry, path)
                   for entry in data.get("added_tokens", [])]

    from_lists: dict[int, _Added] = {}
    for tid, entry, path in listed:
        if not isinstance(tid, int) or not 0 <= tid < vocab_size:
            raise InputError(path, f"added token id {tid!r} is outside the vocabulary of {vocab_size}")
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise InputError(path, f"added token {tid} has no text")
        token = _Added(entry["content"], bool(entry.get("special")), path)
        seen = from_lists.get(tid)
        if seen is not None and (seen.content, seen.special) != (token.content, token.special):
            raise InputError(path, f"added token {tid} is {token.content[:40]!r} (special={token.special}) but "
                                   f"{seen.content[:40]!r} (special={seen.special}) in {seen.source.name}")
        from_lists[tid] = token
    added.update(from_lists)
    return added


def _add_flags(tok_cfg: dict[str, Any], data: dict[str, Any] | None) -> tuple[bool, bool]:
    """add_bos/add_eos: tokenizer_config.json says so in transformers 4; transformers 5 keeps it only in
    tokenizer.json's post-processor template. GemmaTokenizer adds <bos> and no <eos> by default."""
    add_bos, add_eos = tok_cfg.get("add_bos_token"), tok_cfg.get("add_eos_token")
    post = (data or {}).get("post_processor")
    if isinstance(post, dict) and post.get("type") == "TemplateProcessing" and isinstance(post.get("single"), list):
        single = post["single"]
        is_special = [isinstance(p, dict) and "SpecialToken" in p for p in single]
        if add_bos is None:
            add_bos = bool(is_special) and is_special[0]
        if add_eos is None:
            add_eos = bool(is_special) and is_special[-1] and not all(is_special)
    return bool(True if add_bos is None else add_bos), bool(add_eos)


def read_vocabulary(folder: Path, vocab_size: int) -> Vocabulary:
    """Tokens, scores and types padded to the embedding's row count, with explicit special ids.

    The special ids are written explicitly because llama.cpp's SPM defaults (bos 1, eos 2) are Gemma's
    eos and bos swapped — a silent and total failure.
    """
    model_path, json_path = folder / "tokenizer.model", folder / "tokenizer.json"
    has_model, has_json = model_path.is_file(), json_path.is_file()
    if not has_model and not has_json:
        raise InputError(model_path, "missing, and so is tokenizer.json (a Gemma 3 checkpoint has one or both)")
    data = read_tokenizer_json(json_path) if has_json else None
    if has_model:  # llama.cpp's Gemma conversion reads the SentencePiece model: its scores are the originals
        pieces = _spm_pieces(model_path, vocab_size)
        if data is not None:
            _check_agreement(pieces, data, json_path)
    else:
        assert data is not None
        pieces = _json_pieces(data, json_path, vocab_size)

    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [PAD_SCORE] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i, (text, score, kind) in enumerate(zip(pieces.texts, pieces.scores, pieces.types, strict=True)):
        tokens[i], scores[i], types[i] = text.encode("utf-8"), score, kind

    config_path = folder / "tokenizer_config.json"
    tok_cfg = read_json(config_path, required=False)
    for tid, token in _added_tokens(folder, data, tok_cfg, vocab_size).items():
        text = token.content
        if token.special or looks_special(text):
            types[tid] = TokenType.CONTROL
        else:
            # llama.cpp matches user-defined tokens in the raw text and prints them as they are, so their
            # spaces must be real spaces: "▁▁▁▁" would never match typed indentation and would print as "▁▁▁▁"
            text = text.replace(SPACE_MARK, " ")
            types[tid] = TokenType.USER_DEFINED
        tokens[tid] = text.encode("utf-8")
        scores[tid] = ADDED_SCORE

    special_map = read_json(folder / "special_tokens_map.json", required=False)
    by_text: dict[bytes, int] = {}
    for i, t in enumerate(tokens):
        by_text.setdefault(t, i)
    def special(kind: str) -> int:
        text = _token_text(tok_cfg.get(f"{kind}_token")) or _token_text(special_map.get(f"{kind}_token"))
        if text is not None:
            tid = by_text.get(text.encode("utf-8"))
            if tid is None:
                raise InputError(config_path, f"{kind}_token {text!r} is not in the vocabulary")
            return tid
        tid = pieces.own_ids.get(kind, by_text.get(GEMMA_SPECIALS[kind].encode()))
        if tid is None:
            raise InputError(config_path, f"no {kind} token is defined")
        return tid

    add_bos, add_eos = _add_flags(tok_cfg, data)
    vocab = Vocabulary(
        tokens=tokens,
        scores=scores,
        types=[int(t) for t in types],
        bos_id=special("bos"),
        eos_id=special("eos"),
        pad_id=special("pad"),
        unk_id=special("unk"),
        add_bos=add_bos,
        add_eos=add_eos,
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
