"""Constrained answers stay valid UTF-8: the byte-level check against Python's own decoder, the guard over a small
vocabulary of byte tokens, and sampling on the tiny random model (whose vocabulary is a quarter byte tokens)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from medgemma_cli.llama import grammar as G
from medgemma_cli.llama.utf8 import OddPieces, Utf8Guard, incomplete_tail

# Every way to finish a character: its second byte is 80-BF, narrowed for E0 (A0-), F0 (90-), ED and F4 (-9F, -8F)
ENDINGS = [b""] + [bytes([b]) + b"\x80" * k for b in (0x80, 0x90, 0xA0) for k in range(3)]


def _oracle(data: bytes) -> int | None:
    """incomplete_tail by Python's strict decoder: 0 if `data` decodes, k if it decodes once the shortest ending
    that makes it do so is added (k bytes of it were there), None if no ending does."""
    for end in ENDINGS:
        try:
            (data + end).decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not end:
            return 0
        whole = data + end
        start = max(i for i in range(len(whole)) if whole[i] & 0xC0 != 0x80)  # where the last character starts
        return len(data) - start
    return None


def test_every_one_and_two_byte_sequence_agrees_with_pythons_decoder():
    for a in range(256):
        assert incomplete_tail(bytes([a])) == _oracle(bytes([a])), hex(a)
        for b in range(256):
            data = bytes([a, b])
            assert incomplete_tail(data) == _oracle(data), data


def test_longer_sequences_agree_with_pythons_decoder():
    rng = random.Random(0)
    edges = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED,
             0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xF8, 0xFF]
    for _ in range(20000):
        data = bytes(rng.choice(edges) for _ in range(rng.randint(3, 7)))
        assert incomplete_tail(data) == _oracle(data), data


@pytest.mark.parametrize(("data", "tail"), [
    (b"plain", 0), ("€".encode(), 0), (b"\xe2", 1), (b"\xe2\x82", 2), (b"a\xf0\x9f\x98", 3), ("😀".encode(), 0),
    (b"\xed\x9f\xbf", 0), (b"\xf4\x8f\xbf\xbf", 0),  # U+D7FF, U+10FFFF: the last before the surrogates, the last
    (b"\x80", None), (b"a\xbf", None),  # a stray continuation byte
    (b"\xe2A", None), (b"\xe2\x82 ", None), (b"\xc3\xa9\xa9", None),  # a lead byte without its continuations
    (b"\xc0", None), (b"\xc1\xbf", None), (b"\xe0\x80", None), (b"\xf0\x8f", None),  # overlong forms
    (b"\xed\xa0", None),  # a surrogate (U+D800-DFFF), refused at its second byte: no ending could make it valid
    (b"\xf4\x90", None), (b"\xf5", None), (b"\xf8\x80\x80\x80", None), (b"\xff", None),  # past U+10FFFF
])
def test_the_forms_refused_and_the_characters_left_unfinished(data, tail):
    assert incomplete_tail(data) == tail


# A vocabulary: whole pieces, the byte tokens a character is spelled with, broken ones, and a token with no text
VOCAB = [b"a", b" the", "é".encode(), b"\xe2", b"\x82", b"\xac", b"\x80", b"\xf5", b"\xc0", b"\xe0", b"\xa0", b"",
         b"\xe2\x82", b"\xac!"]
ID = {p: i for i, p in enumerate(VOCAB)}


def _guard() -> tuple[Utf8Guard, list[int]]:
    scans: list[int] = []
    odd = OddPieces.scan(VOCAB)
    return Utf8Guard(lambda: (scans.append(1), odd)[1]), scans


def _allowed(guard: Utf8Guard) -> set[bytes]:
    return {VOCAB[i] for i in np.flatnonzero(np.isfinite(guard.mask(np.zeros(len(VOCAB), np.float32))))}


def test_only_the_pieces_that_are_not_whole_characters_are_kept():
    odd = OddPieces.scan(VOCAB)
    assert [VOCAB[i] for i in odd.ids] == [b"\xe2", b"\x82", b"\xac", b"\x80", b"\xf5", b"\xc0", b"\xe0", b"\xa0",
                                           b"\xe2\x82", b"\xac!"] == odd.pieces
    assert odd.n_vocab == len(VOCAB)


def test_a_character_spelled_over_several_tokens_is_let_through():
    guard, scans = _guard()
    for piece in (b"\xe2", b"\x82", b"\xac"):  # € in three byte tokens
        assert guard.allows(piece)
        guard.accept(piece)
    assert guard.pending == b""
    guard.accept(b"\xe2\x82")
    assert guard.pending == b"\xe2\x82" and guard.allows(b"\xac!")  # a merge that ends it and goes on
    guard.accept(b"\xac!")
    assert guard.pending == b"" and guard.allows(b"a") and guard.allows(b"")
    assert not scans  # nothing was refused: the vocabulary was never read


def test_tokens_that_would_break_the_text_are_refused_and_masked():
    guard, _ = _guard()
    for broken in (b"\x80", b"\xf5", b"\xc0", b"\xac!"):  # a stray continuation, F5, C0, a merge starting with one
        assert not guard.allows(broken)
    assert _allowed(guard) == set(VOCAB) - {b"\x80", b"\xf5", b"\xc0", b"\x82", b"\xac", b"\xa0", b"\xac!"}
    guard.accept(b"\xe2")
    for cut_short in (b"a", b" the", "é".encode(), b"\xe2", b""):  # an ASCII letter, a new character, the end
        assert not guard.allows(cut_short)
    assert _allowed(guard) == {b"\x82", b"\x80", b"\xac", b"\xa0"}  # only the continuation bytes
    guard.accept(b"\x82")
    assert _allowed(guard) == {b"\x82", b"\x80", b"\xac", b"\xa0", b"\xac!"}
    guard.drop()
    guard.accept(b"\xe0")
    assert _allowed(guard) == {b"\xa0", b"\xac"}  # E0 80 and E0 82 would be overlong
    with pytest.raises(ValueError, match="valid UTF-8"):
        guard.accept(b"\x80")


# --- sampling on the tiny random model -------------------------------------------------------------------------

CAPPED = {"type": "array", "maxItems": 3, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "unit"],
    "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8},
                   "unit": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]}}}}


@pytest.fixture(scope="module")
def engine(convert_tiny):
    from medgemma_cli.llama.engine import Engine
    from medgemma_cli.llama.model_files import resolve_model

    e = Engine(resolve_model(convert_tiny("Q8_0"), None, None), n_ctx=1024)
    yield e
    e.close()


def _generate(engine, prompt: str, constraint: G.Constraint, max_tokens: int, seed: int):
    engine.reset()
    engine.decode_text(engine.render([{"role": "user", "content": [{"type": "text", "text": prompt}]}]))
    return engine.generate(max_tokens, 1.0, seed, constraint=constraint)


@pytest.mark.slow
def test_the_engine_reads_its_odd_pieces_token_by_token(engine):
    odd = engine.odd_pieces()
    assert odd is engine.odd_pieces()  # read once
    n_vocab = engine._lib.llama_vocab_n_tokens(engine.vocab)
    assert odd.n_vocab == n_vocab
    assert odd.pieces == [engine._piece_bytes(int(t)) for t in odd.ids]  # each token's own piece
    assert sorted(odd.pieces) == [bytes([b]) for b in range(0x80, 0x100)]  # the byte tokens: the rest are text


@pytest.mark.slow
def test_sampled_json_is_valid_utf8_within_its_caps(engine):
    """Before the guard, seed 9 wrote F5 B0 A0 A1 in a name capped at 8 characters: one character to llama.cpp's
    grammar, four U+FFFD to Python, and the name 11 characters long (the other seeds pass either way)."""
    jsonschema = pytest.importorskip("jsonschema")
    budget = G.max_chars(CAPPED)
    assert budget is not None
    for seed in range(10):
        out = _generate(engine, f"Read the lab tests {seed}.", G.json_answer(CAPPED), 2 * budget, seed)
        assert "\ufffd" not in out.text and out.stopped == "eos", (seed, out.text)
        jsonschema.validate(json.loads(out.text), CAPPED)


@pytest.mark.slow
def test_an_answer_cut_inside_a_character_ends_at_the_last_whole_one(engine, monkeypatch):
    """A grammar of non-ASCII text only: the random model spells it in byte tokens, and a budget that runs out in
    the middle of a character leaves that character out instead of ending the answer in U+FFFD."""
    from medgemma_cli.llama import engine as engine_module

    guards: list[Utf8Guard] = []

    class Seen(Utf8Guard):
        def __init__(self, *a):
            super().__init__(*a)
            guards.append(self)

    monkeypatch.setattr(engine_module, "Utf8Guard", Seen, raising=False)  # without a guard: fails below
    spelled = G.raw_grammar(r"root ::= [\u0080-\U0010FFFF]+")
    for seed in range(4):
        for max_tokens in (4, 5, 6):
            out = _generate(engine, "Write something.", spelled, max_tokens, seed)
            assert out.stopped == "max_tokens" and "\ufffd" not in out.text, (seed, out.text)
            assert out.text and all(ord(c) >= 0x80 for c in out.text)
    assert len(guards) == 12 and any(g.pending for g in guards)  # some did stop inside a character
