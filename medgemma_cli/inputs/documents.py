"""Documents as images (MedGemma 1.5 reads lab reports as page images): PDF pages rendered by PDFium (pypdfium2),
and the PDF inside a DICOM Encapsulated PDF object. Scanned pages as PNG/JPEG are ordinary images.

A page is rendered so that its longer side is the model's input size, then zero-padded to a square, centred:
the serving code's preprocessing ("method performed in training"), so the text keeps its proportions where a
stretch would squash it. The text layer, when there is one, is still read as a note (notes.py)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgemma_cli.errors import InputError

if TYPE_CHECKING:
    from pydicom import Dataset

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage
PAGE_CONTENT_BYTES = 16 << 20  # a page whose drawing instructions inflate beyond this is not rendered (a bomb)


def is_encapsulated_pdf(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) == ENCAPSULATED_PDF or (
        "EncapsulatedDocument" in ds and str(ds.get("MIMETypeOfEncapsulatedDocument", "")).lower() == "application/pdf")


def encapsulated_pdf(ds: Dataset, path: Path) -> bytes:
    """The PDF bytes of an Encapsulated PDF object (its even-length padding is harmless to PDF readers)."""
    data = ds.get("EncapsulatedDocument")
    if not data:
        raise InputError(path, "Encapsulated PDF object without its document")
    data = bytes(data)
    if not data.lstrip()[:5] == b"%PDF-":
        raise InputError(path, "the encapsulated document is not a PDF")
    return data


def pad_square(rgb: np.ndarray) -> np.ndarray:
    """Centred zero padding to a square (top/left get the smaller half), as the reference serving code does."""
    h, w = rgb.shape[:2]
    s = max(h, w)
    out = np.zeros((s, s, 3), np.uint8)
    top, left = (s - h) // 2, (s - w) // 2
    out[top:top + h, left:left + w] = rgb
    return out


def render_pages(source: Path | bytes, path: Path, size: int, max_pages: int) -> tuple[list[np.ndarray], list[str]]:
    """The first `max_pages` pages as size×size RGB uint8 (rendered to fit, zero-padded), and notes on what was
    left out. `path` names the file in errors (for DICOM, the object holding the PDF)."""
    pages, notes = numbered_pages(source, path, size, max_pages)
    return [rgb for _, rgb in pages], notes


def numbered_pages(source: Path | bytes, path: Path, size: int, max_pages: int
                   ) -> tuple[list[tuple[int, np.ndarray]], list[str]]:
    """As `render_pages`, each page with its 1-based number (a page left out leaves a gap, not a renumbering)."""
    numbers, notes = planned_pages(source, path, max_pages)
    with open_pdf(source, path) as pdf:
        return [(n, render_page(pdf, n, path, size)) for n in numbers], notes


def planned_pages(source: Path | bytes, path: Path, max_pages: int) -> tuple[list[int], list[str]]:
    """The 1-based numbers of the first `max_pages` pages that will be rendered, and notes on those left out (a
    page whose drawing instructions inflate too far, one of no size, those past `max_pages`). Nothing is drawn:
    a count known before the model loads is the count of pages it will read."""
    oversized = _oversized_pages(source, max_pages)
    notes: list[str] = []
    numbers: list[int] = []
    with open_pdf(source, path) as pdf:
        import pypdfium2 as pdfium

        try:
            count = len(pdf)
            for i in range(min(count, max_pages)):
                if i in oversized:
                    notes.append(f"page {i + 1} not rendered: its drawing instructions inflate beyond "
                                 f"{PAGE_CONTENT_BYTES >> 20} MB")
                    continue
                w, h = pdf.get_page_size(i)
                if not (w > 0 and h > 0):
                    notes.append(f"page {i + 1} not rendered: it declares a {w}×{h} pt page")
                    continue
                numbers.append(i + 1)
        except pdfium.PdfiumError as e:
            raise InputError(path, f"cannot read the PDF's pages ({e})") from None
    if count > max_pages:
        notes.append(f"{count} pages: the first {max_pages} rendered")
    return numbers, notes


@contextmanager
def open_pdf(source: Path | bytes, path: Path) -> Iterator[Any]:
    """The PDF opened by PDFium (a `PdfDocument`), closed after; one line naming `path` if it cannot be."""
    try:
        import pypdfium2 as pdfium
    except ImportError as e:
        raise InputError(path, f"PDF pages need pypdfium2 (pip install pypdfium2): {e}") from None
    try:
        pdf = pdfium.PdfDocument(source if isinstance(source, bytes) else str(source))
    except pdfium.PdfiumError as e:
        raise InputError(path, f"not a readable PDF ({e})") from None
    try:
        yield pdf
    finally:
        pdf.close()


def render_page(pdf: Any, number: int, path: Path, size: int) -> np.ndarray:
    """Page `number` (1-based) of an open PDF, rendered to fit `size` and zero-padded to a square, as RGB uint8."""
    import pypdfium2 as pdfium

    try:
        page = pdf[number - 1]
        try:
            w, h = page.get_size()
            if not (w > 0 and h > 0):
                raise InputError(path, f"page {number} declares a {w}×{h} pt page")
            rgb = np.asarray(page.render(scale=size / max(w, h)).to_pil().convert("RGB"))
        finally:
            page.close()
    except pdfium.PdfiumError as e:
        raise InputError(path, f"cannot render page {number} ({e})") from None
    return np.asarray(_fit(pad_square(rgb), size))


def page_count(source: Path | bytes, path: Path) -> int:
    """How many pages the PDF has (PDFium reads only its page tree); one line naming `path` if it cannot."""
    with open_pdf(source, path) as pdf:
        return len(pdf)


def _fit(square: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if square.shape[0] == size:
        return square
    return np.asarray(Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR))


def _oversized_pages(source: Path | bytes, max_pages: int) -> set[int]:
    """Pages whose content streams inflate beyond PAGE_CONTENT_BYTES, found through pypdf (which the text layer
    reads anyway) before PDFium would build them into memory. Unreadable here: PDFium says why, later."""
    try:
        from pypdf import PdfReader
        from pypdf.errors import LimitReachedError

        reader = PdfReader(io.BytesIO(source) if isinstance(source, bytes) else str(source))
        out = set()
        for i, page in enumerate(reader.pages):
            if i >= max_pages:
                break
            try:
                contents: Any = page.get_contents()
                if contents is not None and len(contents.get_data()) > PAGE_CONTENT_BYTES:
                    out.add(i)
            except LimitReachedError:  # pypdf's own inflate limit: a bomb
                out.add(i)
        return out
    except Exception:  # noqa: BLE001 - pypdf's view of a damaged file; PDFium decides whether it renders
        return set()
