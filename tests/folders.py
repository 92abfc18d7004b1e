"""Folders of scans the batch tests walk: pydicom's test files laid out as a night's worth of studies."""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path

import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

from pictures import picture


def data(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def ct_series(folder: Path, n: int, series_uid: str, phi: bool = False) -> None:
    base = pydicom.dcmread(data("CT_small.dcm"))
    order = list(range(n))
    random.Random(2).shuffle(order)
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = f"{series_uid}.{i}"
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * i]
        ds.InstanceNumber = i + 1
        if phi:
            ds.PatientName, ds.PatientID, ds.StudyDate = "Roe^Richard", "MRN-424242", "20240102"
        ds.save_as(folder / f"s{order[i]:02d}.dcm")


def messy_folder(root: Path) -> Path:
    """Series, a multi-frame cine, photos, a truncated and a fake DICOM, an empty file and a symlink loop."""
    (root / "ct").mkdir(parents=True)
    ct_series(root / "ct", 6, "1.2.826.0.1.3680043.99.1")
    (root / "mr").mkdir()
    (root / "mr" / "IM0001").write_bytes(data("MR_small.dcm").read_bytes())  # no extension: found by content
    (root / "cine").mkdir()
    (root / "cine" / "multi.dcm").write_bytes(data("emri_small.dcm").read_bytes())
    Image.fromarray(picture(20, 30, 120)).save(root / "photo.png")
    Image.fromarray(picture(20, 30, 60)).save(root / "scan.jpg")
    full = data("CT_small.dcm").read_bytes()
    (root / "broken.dcm").write_bytes(full[: len(full) - 20000])  # header intact, pixels cut
    (root / "notdicom.dcm").write_text("hello")
    (root / "empty.dcm").write_bytes(b"")
    os.symlink(root, root / "ct" / "loop")
    return root
