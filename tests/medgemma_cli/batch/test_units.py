"""A batch's folder walk and units (model-free)."""

from __future__ import annotations

from medgemma_cli.batch.units import make_units
from medgemma_cli.inputs.walk import IMAGE_INPUTS, walk


def test_walk_and_units(messy):
    w = walk(messy, IMAGE_INPUTS)
    skipped = dict(w.skipped)
    assert skipped["notdicom.dcm"].startswith("not DICOM") and skipped["empty.dcm"] == "empty file"
    assert any("loop" in path for path in skipped)
    units = make_units(messy, w.files, "series")
    sizes = sorted(len(u.files) for u in units)
    assert sizes == [1, 1, 1, 1, 1, 6]  # CT series, MR, multi-frame, broken CT, png, jpg
    assert len(make_units(messy, w.files, "file")) == 11
