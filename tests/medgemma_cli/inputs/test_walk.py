"""One folder walk for `ask dir/` and `batch dir/` (model-free): the same rules, the kinds each reads, and every
file left out said with its reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file

from medgemma_cli.inputs.collect import expand
from medgemma_cli.inputs.walk import IMAGE_INPUTS, MODEL_INPUTS, walk


def _folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ct.dcm").write_bytes(Path(get_testdata_file("CT_small.dcm", download=False)).read_bytes())
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / "photo.png")
    (root / "history.txt").write_text("Smoker.")
    (root / "scanner.log").write_bytes(b"\x00\x01binary")
    (root / "empty.png").write_bytes(b"")
    (root / "DICOMDIR").write_bytes(b"\x00" * 200)
    return root


def test_ask_reads_notes_batch_does_not_and_both_say_what_they_left_out(tmp_path):
    root = _folder(tmp_path / "study")
    asked = walk(root, MODEL_INPUTS)
    assert sorted(p.name for p in asked.files) == ["ct.dcm", "history.txt", "photo.png"]
    why = dict(asked.skipped)
    assert why["scanner.log"] == "not DICOM, a PNG/JPEG image, a whole slide or a text/PDF note"
    assert why["empty.png"] == "empty file" and why["DICOMDIR"].startswith("DICOMDIR index")
    batched = walk(root, IMAGE_INPUTS)
    assert sorted(p.name for p in batched.files) == ["ct.dcm", "photo.png"]
    assert dict(batched.skipped)["history.txt"] == "not DICOM, a PNG/JPEG image or a whole slide"


def test_a_folder_given_to_ask_is_walked_by_the_same_rules(tmp_path):
    root = _folder(tmp_path / "study")
    files, warnings = expand([root])
    assert files == walk(root, MODEL_INPUTS).files
    assert "skipped scanner.log: not DICOM, a PNG/JPEG image, a whole slide or a text/PDF note" in warnings
    assert "skipped empty.png: empty file" in warnings
