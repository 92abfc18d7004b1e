"""Synthetic documents for the tests and the benchmark: a lab report PDF whose pages hold a table (ruled cells,
Helvetica text, a text layer), written by hand with a correct xref table; a scanned page (an image-only PDF);
a DICOM Encapsulated PDF object."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

HEADER = ("Test", "Result", "Unit", "Reference range")
PAGES = (  # (panel, rows) per page
    ("Complete blood count", [("Haemoglobin", "13.2", "g/dL", "12.0-15.5"), ("White cells", "11.8", "10^9/L",
                                                                             "4.0-11.0"),
                              ("Platelets", "250", "10^9/L", "150-400")]),
    ("Renal function", [("Creatinine", "1.4", "mg/dL", "0.6-1.2"), ("Urea", "42", "mg/dL", "15-45"),
                        ("Potassium", "4.1", "mmol/L", "3.5-5.1")]),
)


def _escape(text: str) -> bytes:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")


def _page_stream(title: str, panel: str, rows: Sequence[Sequence[str]], page: int, pages: int) -> bytes:
    parts = [b"BT /F1 16 Tf 72 740 Td (" + _escape(title) + b") Tj ET",
             b"BT /F1 12 Tf 72 715 Td (" + _escape(f"Panel: {panel}   Specimen: serum   "
                                                    f"Collected: 03-02-2026 08:15:00") + b") Tj ET"]
    widths = (170, 90, 90, 130)
    top, height = 690, 24
    table = [HEADER, *rows]
    for r, row in enumerate(table):
        y = top - r * height
        x = 72
        for w, cell in zip(widths, row, strict=True):
            parts.append(b"%d %d %d %d re S" % (x, y - height, w, height))
            parts.append(b"BT /F1 11 Tf %d %d Td (" % (x + 6, y - 16) + _escape(cell) + b") Tj ET")
            x += w
    parts.append(b"BT /F1 9 Tf 72 60 Td (" + _escape(f"Page {page} of {pages}") + b") Tj ET")
    return b"\n".join(parts)


def pdf_bytes(objects: list[bytes]) -> bytes:
    """A PDF of these objects (1 the catalog), with a correct cross-reference table."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def lab_report_pdf(pages: Sequence[tuple[str, Sequence[Sequence[str]]]] = PAGES,
                   title: str = "City Hospital Laboratory - Report") -> bytes:
    """A US-letter lab report, one table per page: objects 1 catalog, 2 pages, 3 font, then page/content pairs."""
    n = len(pages)
    kids = b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(n))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % n,
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, (panel, rows) in enumerate(pages):
        stream = _page_stream(title, panel, rows, i + 1, n)
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                       b"/Resources << /Font << /F1 3 0 R >> >> >>" % (5 + 2 * i))
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    return pdf_bytes(objects)


def scanned_pdf(path: Path, pages: int = 1) -> Path:
    """An image-only PDF (what a scanner writes): no text layer, the page a picture of a table."""
    from PIL import Image, ImageDraw

    images = []
    for k in range(pages):
        im = Image.new("RGB", (850, 1100), "white")
        draw = ImageDraw.Draw(im)
        for r in range(6):
            for c in range(4):
                draw.rectangle((100 + c * 160, 200 + r * 40, 260 + c * 160, 240 + r * 40), outline="black", width=2)
        draw.text((100, 120), f"Scanned lab report, page {k + 1}", fill="black")
        images.append(im)
    images[0].save(path, format="PDF", save_all=True, append_images=images[1:], resolution=100.0)
    return Path(path)


def encapsulated_pdf_dicom(path: Path, pdf: bytes, patient_name: str = "Doe^Jane") -> Path:
    """A DICOM Encapsulated PDF object (SOP class 1.2.840.10008.5.1.4.1.1.104.1) holding `pdf`."""
    from medgemma_cli.offline import import_pydicom

    pydicom = import_pydicom()  # first: pydicom without an HTTP client
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, generate_uid
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DOC"
    ds.PatientName = patient_name
    ds.PatientID = "PID-0002"
    ds.DocumentTitle = "Lab report"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.BurnedInAnnotation = "YES"
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1")
    ds.file_meta = meta
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return Path(path)
