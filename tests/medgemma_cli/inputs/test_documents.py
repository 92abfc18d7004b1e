"""Documents as images: PDF pages rendered (fit, zero-padded square) beside their text layer, scanned PDFs (no
text layer: pages only), DICOM Encapsulated PDF. Documents are made by the tests; no model is loaded."""

from __future__ import annotations

import numpy as np
import pytest

from medgemma_cli.errors import InputError
from medgemma_cli.inputs.collect import collect
from medgemma_cli.inputs.documents import pad_square
from medgemma_cli.testing.documents import encapsulated_pdf_dicom, lab_report_pdf, scanned_pdf


@pytest.fixture
def report(tmp_path):
    path = tmp_path / "labs.pdf"
    path.write_bytes(lab_report_pdf())
    return path


def test_each_page_is_an_image_and_the_text_layer_a_note(report):
    c = collect([report], 896)
    assert len(c.images) == 2 and all(img.rgb.shape == (896, 896, 3) for img in c.images)
    (name, text), = c.notes
    assert name == "labs.pdf" and "Haemoglobin" in text and "Creatinine" in text
    assert c.records[0].kind == "document" and "2 page(s) as 896 px images" in c.records[0].detail
    page = c.images[0].rgb
    # US letter (612 × 792 pt) fits 896 px tall, 692 wide: the sides are zero padding, the page white
    left = (896 - round(612 * 896 / 792)) // 2
    assert (page[:, : left - 1] == 0).all() and (page[:, -(left - 1):] == 0).all()
    assert (page[400:, left + 5: 896 - left - 5] == 255).mean() > 0.8
    ruled = page[100:350, left:896 - left].min(axis=-1) < 100  # the table's rules and text are drawn
    assert ruled.mean() > 0.02
    assert not np.array_equal(c.images[0].rgb, c.images[1].rgb)  # two pages, two pictures


def test_a_scanned_pdf_has_pages_but_no_text_layer(tmp_path):
    path = scanned_pdf(tmp_path / "scan.pdf", pages=2)
    c = collect([path], 64)
    assert len(c.images) == 2 and c.notes == [] and "no text layer" in c.records[0].detail
    with pytest.raises(InputError, match="no text layer"):  # a model that reads no images: nothing to read
        collect([path], None)


def test_a_text_only_model_still_gets_the_text(report):
    c = collect([report], None)
    assert c.images == [] and c.records[0].kind == "note" and "Platelets" in c.notes[0][1]


def test_pages_beyond_the_cap_are_said(report):
    c = collect([report], 64, max_pages=1)
    assert len(c.images) == 1 and any("2 pages: the first 1 rendered" in w for w in c.warnings)


def test_dicom_encapsulated_pdf(tmp_path):
    pdf = lab_report_pdf(title="Report for Jane Doe")
    dcm = encapsulated_pdf_dicom(tmp_path / "doc.dcm", pdf)
    c = collect([dcm], 128)
    assert len(c.images) == 2 and c.records[0].kind == "dicom-pdf"
    assert "Haemoglobin" in c.notes[0][1] and "Jane" not in c.notes[0][1]  # the header's name, scrubbed
    direct = tmp_path / "same.pdf"
    direct.write_bytes(pdf)
    assert np.array_equal(collect([direct], 128).images[1].rgb, c.images[1].rgb)
    text_only = collect([dcm], None)
    assert text_only.records[0].kind == "dicom-pdf" and text_only.images == []


def test_not_a_pdf_inside_dicom_is_named(tmp_path):
    dcm = encapsulated_pdf_dicom(tmp_path / "doc.dcm", b"GIF89a not a pdf")
    with pytest.raises(InputError, match=r"doc\.dcm: the encapsulated document is not a PDF"):
        collect([dcm], 64)


def test_pad_square_centres_with_zeros():
    out = pad_square(np.full((2, 5, 3), 7, np.uint8))
    assert out.shape == (5, 5, 3) and (out[1:3] == 7).all() and (out[0] == 0).all() and (out[3:] == 0).all()
