"""Clinical notes: plain text, Markdown, and PDF (through pypdf when it is installed)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from medgemma_cli.errors import InputError

NOTE_SUFFIXES = {".txt", ".md", ".markdown", ".text", ".pdf"}
BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"),
        (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))


@dataclass
class Note:
    text: str
    warnings: list[str] = field(default_factory=list)  # decoded by a guess, lossily, or read in part
    encoding: str = "utf-8"

    @property
    def how(self) -> str:
        return "" if self.encoding == "utf-8" else f", {self.encoding}"


def read_note(path: Path, budget: int | None = None) -> Note:
    """A note's text, read up to `budget` bytes (and MEDGEMMA_MAX_NOTE_BYTES) before anything is decoded."""
    if path.suffix.lower() == ".pdf":
        return Note(_read_pdf(path, budget), encoding="pdf")
    from medgemma_cli.inputs.limits import limit

    cap = min(limit("note_bytes"), budget or limit("note_bytes"))
    try:
        with open(path, "rb") as f:  # a byte budget, not the whole file: the context holds a few thousand tokens
            data = f.read(cap + 1)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from e
    cut = size - cap if len(data) > cap else 0
    note = decode_text(data[:cap], truncated=bool(cut))
    if note is None:
        raise InputError(path, "looks binary, not a text note")
    note.text = note.text.strip()
    if not note.text:
        raise InputError(path, "the note is empty")
    if cut:
        why = "MEDGEMMA_MAX_NOTE_BYTES" if cap == limit("note_bytes") else "more than the context holds"
        note.text += f"\n[… the rest of this note, {cut:,} bytes, was not read ({why})]"
        note.warnings.append(f"only the first {cap:,} bytes were read ({why})")
    return note


def decode_text(data: bytes, truncated: bool = False) -> Note | None:
    """Bytes → text: a BOM decides; else UTF-8 if it decodes; else UTF-16 recognised by its zero bytes; else
    the most likely legacy encoding (charset-normalizer), said to be a guess. None: binary, not text."""
    for bom, enc in BOMS:
        if data.startswith(bom):
            return _lossy(data[len(bom):], enc, truncated, f"{enc} (byte-order mark)")
    try:
        return Note(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        if truncated and e.start >= len(data) - 3 and e.reason == "unexpected end of data":
            return Note(data[:e.start].decode("utf-8"))  # the budget cut a character in two
    head = data[:4096]
    if len(head) >= 4:
        even, odd = head[0::2].count(0), head[1::2].count(0)
        if odd > len(head) // 4 and even < odd // 8:  # ASCII-heavy UTF-16: every other byte is zero
            return _lossy(data, "utf-16-le", truncated, "UTF-16 little-endian without a byte-order mark")
        if even > len(head) // 4 and odd < even // 8:
            return _lossy(data, "utf-16-be", truncated, "UTF-16 big-endian without a byte-order mark")
    if b"\x00" in head:
        return None
    enc = _guess_encoding(data[:65536])
    return _lossy(data, enc, truncated, f"{enc}, a guess: it is not UTF-8")


def _lossy(data: bytes, encoding: str, truncated: bool, how: str) -> Note:
    text = data.decode(encoding, errors="replace")
    if truncated and text.endswith("\ufffd"):
        text = text.rstrip("\ufffd")
    note = Note(text, encoding=encoding)
    if encoding != "utf-8":
        note.warnings.append(f"decoded as {how}")
    bad = text.count("\ufffd") - data.decode(encoding, errors="ignore").count("\ufffd")
    if bad > 0:
        note.warnings.append(f"{bad} byte sequence(s) could not be decoded and are shown as \ufffd")
    return note


def _guess_encoding(data: bytes) -> str:
    try:
        from charset_normalizer import from_bytes
    except ImportError:
        return "cp1252"
    results = list(from_bytes(data))
    if not results:
        return "cp1252"
    best = results[0]
    for r in results:  # the Western default when it reads as cleanly as the best guess
        if r.encoding == "cp1252" and r.chaos <= best.chaos + 0.01:
            return "cp1252"
    return str(best.encoding)


def pdf_text(path: Path, data: bytes | None = None, budget: int | None = None) -> str:
    """A PDF's text layer ("" for a scanned PDF): the file at `path`, or `data` (a PDF inside a DICOM object)."""
    return _read_pdf(path, budget, data, required=False)


def _read_pdf(path: Path, budget: int | None = None, data: bytes | None = None, required: bool = True) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError as e:
        raise InputError(path, "PDF notes need pypdf (pip install pypdf); or pass the note as .txt") from e
    from medgemma_cli.inputs.limits import limit

    pages, budget = limit("pdf_pages"), min(limit("note_bytes"), budget or limit("note_bytes"))
    try:
        import io

        reader = PdfReader(io.BytesIO(data) if data is not None else str(path))
        parts: list[str] = []
        size = 0
        for i, page in enumerate(reader.pages):
            if i >= pages or size > budget:
                parts.append(f"[… pages {i + 1}–{len(reader.pages)} not read (MEDGEMMA_MAX_PDF_PAGES)]")
                break
            parts.append((page.extract_text() or "").strip())
            size += len(parts[-1])
        text = "\n".join(parts).strip()
    except (PdfReadError, OSError, ValueError, KeyError, NotImplementedError, RecursionError) as e:
        raise InputError(path, f"not a readable PDF ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001 - pypdf's DependencyError (AES), LimitReachedError…: the file's problem
        raise InputError(path, f"not a readable PDF ({type(e).__name__}: {e})") from None
    if not text and required:
        raise InputError(path, "the PDF has no text layer (scanned documents need OCR first, or a model that "
                               "reads images)")
    return text
