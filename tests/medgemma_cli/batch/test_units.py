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


def test_units_count_their_frames(messy):
    units = make_units(messy, walk(messy, IMAGE_INPUTS).files, "series")
    by_size = sorted((len(u.files), u.images) for u in units if not u.error)
    assert (6, 6) in by_size  # the CT series: six single-frame files
    assert (1, 10) in by_size  # the multi-frame MR: one file, ten frames
