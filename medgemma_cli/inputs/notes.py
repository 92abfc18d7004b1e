"""Clinical notes: plain text, Markdown, and PDF (through pypdf when it is installed)."""

from __future__ import annotations

from pathlib import Path

from medgemma_cli.errors import InputError

NOTE_SUFFIXES = {".txt", ".md", ".markdown", ".text", ".pdf"}


def read_note(path: Path) -> str:
    if path.suffix.lower() == ".pdf":
        return _read_pdf(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from e
    if b"\x00" in data[:4096]:
        raise InputError(path, "looks binary, not a text note")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    text = text.strip()
    if not text:
        raise InputError(path, "the note is empty")
    return text


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError as e:
        raise InputError(path, "PDF notes need pypdf (pip install pypdf); or pass the note as .txt") from e
    try:
        reader = PdfReader(str(path))
        text = "\n".join((page.extract_text() or "").strip() for page in reader.pages).strip()
    except (PdfReadError, OSError, ValueError) as e:
        raise InputError(path, f"not a readable PDF ({e})") from e
    if not text:
        raise InputError(path, "the PDF has no text layer (scanned documents need OCR first)")
    return text
