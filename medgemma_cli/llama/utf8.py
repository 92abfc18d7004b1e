"""Constrained answers stay valid UTF-8: a token whose bytes would break the text is never sampled.

Byte tokens (SentencePiece's `<0xE2>` fallback pieces, a byte-level BPE's partial merges) can be put together into
bytes that are not UTF-8. llama.cpp's grammar decodes them leniently (F5–FF read as 4-byte leads, overlong forms,
surrogates and code points past U+10FFFF taken as characters) and counts such a sequence as one character, where
Python decodes it to one U+FFFD per byte: a value capped at 60 characters came out at 63 (invalid under the
user's schema) and carried characters the model never meant. So under a grammar the sampler also refuses every
token that would not continue well-formed UTF-8 (RFC 3629, table 3-7 of the Unicode standard: no stray
continuation byte, no lead byte C0, C1 or F5–FF, no overlong form, no surrogate, nothing past U+10FFFF), checked
byte by byte as soon as a byte rules the character out. While a character is unfinished, only a token that
continues it may follow: not the end of the answer, not a control token.

The cost is one check of the chosen token's bytes, which are read anyway to decode them. Only when that token is
refused is the vocabulary read, once per model, for its few pieces that are not UTF-8 on their own (the 256 byte
tokens; a byte-level BPE's partial merges): every other piece is whole characters, fine between characters and
never a continuation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np


def _size(lead: int) -> int:
    """Bytes in a character starting with `lead` (0: no character starts so)."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0  # a continuation byte, C0/C1 (overlong) or F5-FF (past U+10FFFF)


# The second byte's range after these leads, narrower than 80-BF where that would be overlong (E0, F0), a surrogate
# (ED) or past U+10FFFF (F4)
SECOND = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}


def incomplete_tail(data: bytes) -> int | None:
    """How many bytes at the end of `data` begin a character still unfinished (0 when it ends between
    characters), or None when no bytes appended could make `data` valid UTF-8."""
    if data.isascii():
        return 0
    i, n = 0, len(data)
    while i < n:
        lead = data[i]
        size = _size(lead)
        if not size:
            return None
        for k in range(1, size):
            if i + k == n:
                return k
            lo, hi = SECOND.get(lead, (0x80, 0xBF)) if k == 1 else (0x80, 0xBF)
            if not lo <= data[i + k] <= hi:
                return None
        i += size
    return 0


def _whole(piece: bytes) -> bool:
    """Whether `piece` is whole characters (valid UTF-8 on its own)."""
    if piece.isascii():
        return True
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass
class OddPieces:
    """A vocabulary's pieces that are not whole characters: the only ones that can break UTF-8 between
    characters, and the only ones that can continue an unfinished character."""
    n_vocab: int
    ids: np.ndarray
    pieces: list[bytes]
    _broken: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def scan(cls, pieces: Iterable[bytes]) -> OddPieces:
        """From every token's piece, in token order."""
        n, ids, odd = 0, [], []
        for n, piece in enumerate(pieces, 1):
            if not _whole(piece):
                ids.append(n - 1)
                odd.append(piece)
        return cls(n, np.array(ids, dtype=np.int64), odd)

    def refused(self, pending: bytes) -> np.ndarray:
        """The token ids that may not follow `pending` (the bytes of an unfinished character, or none)."""
        if not pending:  # between characters: the pieces that cannot start valid UTF-8 (the same every time)
            if self._broken is None:
                self._broken = self.ids[[incomplete_tail(p) is None for p in self.pieces]]
            return self._broken
        keep = self.ids[[incomplete_tail(pending + p) is not None for p in self.pieces]]
        out = np.ones(self.n_vocab, bool)
        out[keep] = False
        return np.flatnonzero(out)


class Utf8Guard:
    """One answer's bytes kept valid UTF-8: the bytes of its unfinished character, and which tokens may follow.
    `odd` is asked for the vocabulary's odd pieces only when a token has to be refused."""

    def __init__(self, odd: Callable[[], OddPieces]):
        self._odd = odd
        self.pending = b""  # the unfinished character's bytes so far (at most 3)

    def allows(self, piece: bytes) -> bool:
        """Whether a token adding `piece` to the text keeps it valid (b"" for one that adds nothing: the end, a
        control token, which must not come in the middle of a character)."""
        if not self.pending:
            return _whole(piece) or incomplete_tail(piece) is not None
        return bool(piece) and incomplete_tail(self.pending + piece) is not None

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token `allows` would refuse at -inf."""
        out = np.array(logits, dtype=np.float32, copy=True)
        out[self._odd().refused(self.pending)] = -np.inf
        return out

    def drop(self) -> None:
        """Forget the unfinished character (its bytes are not kept: the text goes on between characters)."""
        self.pending = b""

    def accept(self, piece: bytes) -> None:
        """Only ever a piece `allows` let through."""
        data = self.pending + piece
        tail = incomplete_tail(data)
        if tail is None:
            raise ValueError(f"{data!r} does not continue valid UTF-8")
        self.pending = data[len(data) - tail:] if tail else b""
