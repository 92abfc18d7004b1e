"""`batch --with-prior`: each chest X-ray study paired with the same patient's most recent earlier one in the
folder; the identifiers that pair them never reach the records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medgemma_cli.batch.units import make_units, pair_priors
from medgemma_cli.errors import MedgemmaError
from medgemma_cli.inputs.walk import IMAGE_INPUTS, walk


def chest_xray(path: Path, patient: str, date: str, time: str = "120000", level: int = 100,
               modality: str = "CR", body_part: str = "CHEST") -> None:
    """A small chest radiograph of one study (its own StudyInstanceUID), with the patient's identifiers."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = f"Doe^{patient}", f"MRN-{patient}", "19600101"
    ds.StudyDate, ds.StudyTime, ds.Modality, ds.BodyPartExamined = date, time, modality, body_part
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = (np.arange(256, dtype=np.uint8).reshape(16, 16) // 2 + level // 2).astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def three_patients(tmp_path) -> Path:
    """A: three dates (the middle one twice, same day and time: no order between them), B: two, C: one; plus a CT of
    A's (not a chest X-ray: never paired) and a chest X-ray of B's lateral on another day."""
    root = tmp_path / "cxr"
    chest_xray(root / "a1.dcm", "A", "20240105", level=10)
    chest_xray(root / "a2.dcm", "A", "20240301", "083000", level=40)
    chest_xray(root / "a2b.dcm", "A", "20240301", "083000", level=50)
    chest_xray(root / "a3.dcm", "A", "20240301", "170000", level=70)
    chest_xray(root / "b1.dcm", "B", "20231120", level=90)
    chest_xray(root / "b2.dcm", "B", "20240210", level=120, modality="DX")
    chest_xray(root / "c1.dcm", "C", "20240101", level=150)
    chest_xray(root / "a-ct.dcm", "A", "20240201", level=180, modality="CT", body_part="CHEST")
    chest_xray(root / "b-knee.dcm", "B", "20240101", level=200, body_part="KNEE")
    return root


def test_each_study_gets_the_most_recent_earlier_one(three_patients):
    units = make_units(three_patients, walk(three_patients, IMAGE_INPUTS).files, "study")
    by_file = {u.files[0].name: u for u in units}
    assert pair_priors(units) == 4  # a2, a2b, a3, b2

    def prior(name: str) -> str | None:
        p = by_file[name].prior
        return p.files[0].name if p is not None else None

    assert prior("a1.dcm") is None
    assert prior("a2.dcm") == prior("a2b.dcm") == "a1.dcm"  # same date and time: neither is the other's prior
    assert prior("a3.dcm") in ("a2.dcm", "a2b.dcm")  # later the same day
    assert prior("b1.dcm") is None and prior("b2.dcm") == "b1.dcm"  # CR then DX: both chest X-rays
    assert prior("c1.dcm") is None
    assert prior("a-ct.dcm") is None and prior("b-knee.dcm") is None  # not chest X-rays
    assert by_file["b2.dcm"].prior is not by_file["b-knee.dcm"]


def test_with_prior_needs_study_units(three_patients, tmp_path):
    from medgemma_cli.batch import run_batch

    with pytest.raises(MedgemmaError, match="--unit study"):
        run_batch(three_patients, ["Changed?"], tmp_path / "r.jsonl", with_prior=True, unit="series")


@pytest.mark.slow
def test_batch_with_prior_end_to_end(three_patients, convert_tiny, tmp_path):
    from medgemma_cli.answering import AskOptions
    from medgemma_cli.batch import run_batch

    out = tmp_path / "change.jsonl"
    s = run_batch(three_patients, ["Is it better or worse?"], out, unit="study", with_prior=True,
                  model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=3))
    text = out.read_text()
    records = [json.loads(ln) for ln in text.splitlines()]
    assert s.failed == 0 and len(records) == 9
    by_file = {r["files"][0]: r for r in records}
    ids = {r["files"][0]: r["unit"] for r in records}
    assert by_file["b2.dcm"]["prior_unit"] == ids["b1.dcm"] and by_file["b2.dcm"]["images_sent"] == 2
    assert by_file["a2.dcm"]["prior_unit"] == ids["a1.dcm"]
    assert "prior_unit" not in by_file["a1.dcm"] and by_file["a1.dcm"]["images_sent"] == 1
    for leak in ("MRN-", "Doe", "19600101", "20240105", "1.2.826"):  # identifiers, dates, UIDs
        assert leak not in text
    again = run_batch(three_patients, ["Is it better or worse?"], out, unit="study", with_prior=True,
                      model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=3))
    assert again.records_written == 0
    alone = run_batch(three_patients, ["Is it better or worse?"], out, unit="study", model=convert_tiny("Q8_0"),
                      options=AskOptions(max_tokens=3))
    assert alone.records_written == 9  # without priors it is another question
