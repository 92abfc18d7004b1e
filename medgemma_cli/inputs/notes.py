"""Clinical notes: plain text, Markdown, and PDF (through pypdf when it is installed)."""

from __future__ import annotations

import os
from pathlib import Path

from medgemma_cli.errors import InputError

NOTE_SUFFIXES = {".txt", ".md", ".markdown", ".text", ".pdf"}


def read_note(path: Path) -> str:
    if path.suffix.lower() == ".pdf":
        return _read_pdf(path)
    from medgemma_cli.inputs.limits import limit

    budget = limit("note_bytes")
    try:
        with open(path, "rb") as f:  # a byte budget, not the whole file: the context holds a few thousand tokens
            data = f.read(budget + 1)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from e
    cut = size - budget if len(data) > budget else 0
    data = data[:budget]
    if b"\x00" in data[:4096]:
        raise InputError(path, "looks binary, not a text note")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    text = text.strip()
    if not text:
        raise InputError(path, "the note is empty")
    if cut:
        text += f"\n[… the rest of this note, {cut:,} bytes, was not read (MEDGEMMA_MAX_NOTE_BYTES)]"
    return text


def _read_pdf(path: Path) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError as e:
        raise InputError(path, "PDF notes need pypdf (pip install pypdf); or pass the note as .txt") from e
    from medgemma_cli.inputs.limits import limit

    pages, budget = limit("pdf_pages"), limit("note_bytes")
    try:
        reader = PdfReader(str(path))
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
    if not text:
        raise InputError(path, "the PDF has no text layer (scanned documents need OCR first)")
    return text
