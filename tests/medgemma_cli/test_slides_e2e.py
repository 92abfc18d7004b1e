"""Whole slides end to end on the tiny model: the prompt holds one image per patch (ask), and a slide is one
batch unit whose report thumbnail is its overview with the patches outlined."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgemma_cli.answering import AskOptions, ask
from medgemma_cli.batch import run_batch
from medgemma_cli.batch.report import _thumb_name, thumbnails_dir, write_report
from medgemma_cli.testing.slides import write_dicom_wsi, write_pyramidal_tiff

pytestmark = pytest.mark.slow
CELL = 896  # mpp 1.0 at level 0: 10× is level 0
TISSUE = [(CELL, 0, 3 * CELL, CELL), (0, CELL, CELL, 2 * CELL)]  # cells (1, 0), (2, 0), (0, 1)


def test_ask_sends_one_image_per_patch(model, tmp_path):
    slide = write_pyramidal_tiff(tmp_path / "s.tif", 3 * CELL, 2 * CELL, TISSUE, downsamples=(1, 4), mpp=1.0)
    said = []
    one = ask("Describe.", [slide], model=model, options=AskOptions(max_tokens=2, max_patches=1))
    three = ask("Describe.", [slide], model=model, options=AskOptions(max_tokens=2, on_wait=said.append))
    assert one.images_sent == 1 and three.images_sent == 3
    assert [i["kind"] for i in three.inputs] == ["slide"] and "3 of 3 tissue patches" in three.inputs[0]["rendering"]
    per_image = (three.tokens["prompt"] - one.tokens["prompt"]) / 2
    assert per_image >= 4  # the tiny model's 4 image tokens (and markers) for each extra patch
    assert said and said[0].startswith("3 images")  # the wait, said before the model starts


def test_the_context_bounds_the_patches(model, tmp_path):
    slide = write_pyramidal_tiff(tmp_path / "s.tif", 3 * CELL, 2 * CELL, TISSUE, downsamples=(1, 4), mpp=1.0)
    r = ask("Q?", [slide], model=model, options=AskOptions(max_tokens=8, ctx=120))
    assert 1 <= r.images_sent < 3 and any("slide patches" in w or "sent, sampled" in w for w in r.warnings)


def test_a_slide_is_one_batch_unit_with_its_overview(convert_tiny, tmp_path):
    root = tmp_path / "night"
    write_dicom_wsi(root / "slide", 3 * CELL, 2 * CELL, TISSUE, downsamples=(1, 4), mpp=1.0)
    out = tmp_path / "r.jsonl"
    s = run_batch(root, ["Findings?"], out, unit="file", model=convert_tiny("Q8_0"),
                  options=AskOptions(max_tokens=2, ctx=1024))
    (record,) = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert s.failed == 0 and record["error"] is None
    assert record["images_sent"] == 3 and len(record["files"]) == 3  # two levels and the label: one unit
    thumb = np.asarray(Image.open(thumbnails_dir(out) / _thumb_name(record["unit"])))
    assert thumb.shape[:2] == (341, 512)  # the overview at the slide's proportions, not 160 px squares
    rgb = thumb.astype(int)
    green = ((rgb[..., 1] > rgb[..., 0] + 40) & (rgb[..., 1] > rgb[..., 2] + 40)).sum()
    assert green > 1000  # the three patches sent, outlined (2 px), survive the JPEG
    html = write_report(out, tmp_path / "review.html").read_text()
    assert "data:image/jpeg;base64," in html and "Doe" not in html
    assert Path(tmp_path / "review.html").is_file()
