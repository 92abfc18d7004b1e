"""Whole slides: the level, the tissue mask, the patches (only tissue, raster order, the right level), bounded
reads, and the errors. Slides are drawn by the tests (medgemma_cli.testing.slides); no model is loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medgemma_cli.errors import InputError
from medgemma_cli.inputs import dicom, slides
from medgemma_cli.inputs.collect import collect
from medgemma_cli.inputs.walk import kind_of
from medgemma_cli.testing.slides import region, write_dicom_wsi, write_pyramidal_tiff

# 0.5 µm/px at level 0 (20×); levels ÷1, ÷2, ÷8: 10× is level 1, where a patch cell is 1792 level-0 pixels.
# A 3 × 2 grid of cells at 10×; tissue fills cells (1, 0), (0, 1) and (2, 1), glass the others.
CELL = 1792
W, H = 3 * CELL, 2 * CELL
TISSUE_CELLS = [(1, 0), (0, 1), (2, 1)]
TISSUE = [(c * CELL, r * CELL, (c + 1) * CELL, r * CELL + CELL) for c, r in TISSUE_CELLS]


def _datasets(files):
    return [(f, dicom.read(f, pixels=False)) for f in files]


@pytest.fixture(scope="module", params=["TILED_FULL", "TILED_SPARSE"])
def wsi(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp(request.param)
    write_dicom_wsi(folder, W, H, TISSUE, downsamples=(1, 2, 8), mpp=0.5, sparse=request.param == "TILED_SPARSE")
    return folder


def test_dicom_patches_come_only_from_tissue_in_raster_order_at_10x(wsi):
    reader = slides.DicomSlideReader(_datasets(sorted(wsi.glob("*.dcm"))))
    try:
        assert [lv.downsample for lv in reader.levels] == [1.0, 2.0, 8.0] and reader.base_mpp == pytest.approx(0.5)
        p = slides.plan(reader, "10x", 125)
        assert p.level == 1 and p.mpp == pytest.approx(1.0) and p.grid == (3, 2)
        assert p.cells == p.chosen == TISSUE_CELLS  # raster order: row by row
        got = list(slides.patches(reader, p))
        for (c, r), patch in zip(p.chosen, got, strict=True):
            assert patch.shape == (896, 896, 3)
            assert np.array_equal(patch, region(2, c * 896, r * 896, 896, 896, TISSUE))  # level 1's pixels
        assert slides.plan(reader, "20x").level == 0
        two = slides.plan(reader, "10x", 2)
        assert two.chosen == [(1, 0), (2, 1)] and "3 tissue patches, 2 sampled evenly" in two.notes[-1]
    finally:
        reader.close()


def test_a_patch_reads_only_the_tiles_under_it(wsi, monkeypatch):
    """Bounded memory: a patch of 896 px over 256 px tiles touches at most 5 × 5 tiles, never the level."""
    decoded = []
    real = slides._Instance.tile

    def counting(self, index):
        decoded.append((self.width, index))
        return real(self, index)

    monkeypatch.setattr(slides._Instance, "tile", counting)
    reader = slides.DicomSlideReader(_datasets(sorted(wsi.glob("*.dcm"))))
    try:
        reader.region(1, 896, 0, 896, 896)
        assert 0 < len(decoded) <= 25 and {w for w, _ in decoded} == {W // 2}
        level_tiles = -(-(W // 2) // 256) * -(-(H // 2) // 256)
        assert len(decoded) < level_tiles
    finally:
        reader.close()


def test_jpeg_slide_and_its_label_is_never_read(tmp_path):
    files = write_dicom_wsi(tmp_path, 1792, 1792, [(0, 0, 896, 896)], downsamples=(1, 4), mpp=1.0, jpeg=True)
    label = next(f for f in files if f.name == "label.dcm")
    c = collect([tmp_path], 896)
    assert len(c.images) == 1 and len(c.slides) == 1
    expected = region(1, 0, 0, 896, 896, [(0, 0, 896, 896)])
    assert np.abs(c.images[0].rgb.astype(int) - expected).mean() < 3  # JPEG, quality 90
    assert {r.kind for r in c.records} == {"slide"} and label in {r.path for r in c.records}
    assert "level 0 (10.0×, 1.00 µm/px, 1792×1792), 1 of 1 tissue patches" in c.records[0].detail
    overview = c.slides[0].overview
    assert overview.shape == (512, 512, 3) and (overview == (0, 160, 0)).all(axis=-1).any()  # patch outlined


def test_pyramidal_tiff_through_openslide(tmp_path):
    path = write_pyramidal_tiff(tmp_path / "slide.tif", W, H, TISSUE, downsamples=(1, 2, 8), mpp=0.5)
    assert kind_of(path) == "slide"
    reader = slides.OpenSlideReader(path)
    try:
        p = slides.plan(reader, "10x")
        assert p.level == 1 and p.chosen == TISSUE_CELLS
        for (c, r), patch in zip(p.chosen, slides.patches(reader, p), strict=True):
            assert np.array_equal(patch, region(2, c * 896, r * 896, 896, 896, TISSUE))
    finally:
        reader.close()


def test_the_patch_budget_is_shared_and_the_prompt_holds_that_many_images(wsi, tmp_path):
    other = write_pyramidal_tiff(tmp_path / "b.tif", W, H, TISSUE, downsamples=(1, 2, 8), mpp=0.5)
    c = collect([wsi, other], 32, max_patches=4)
    assert len(c.images) == 4 and [len(s.plan.chosen) for s in c.slides] == [2, 2]
    assert all(img.rgb.shape == (32, 32, 3) and img.label is None for img in c.images)


class _Stub(slides.SlideReader):
    def __init__(self, downsamples, mpp):
        self.name, self.base_mpp = "stub.svs", mpp
        self.levels = [slides.Level(100_000 // d, 80_000 // d, float(d)) for d in downsamples]


@pytest.mark.parametrize(("mag", "level"), [("20x", 1), ("10x", 2), ("5x", 3)])
def test_level_closest_to_the_magnification(mag, level):
    assert slides.choose_level(_Stub((1, 2, 4, 8, 32), 0.25), mag)[0] == level


def test_no_pixel_spacing_is_said_and_no_near_level_is_said():
    level, mpp, notes = slides.choose_level(_Stub((1, 4, 16), None), "10x")
    assert level == 1 and mpp == 1.0 and "no pixel spacing" in notes[0]
    level, _, notes = slides.choose_level(_Stub((1, 16), 0.25), "10x")
    assert "no level near 10x" in notes[-1]


def test_glass_only_and_unreadable_slides_are_one_line_errors(tmp_path):
    write_dicom_wsi(tmp_path / "glass", 1792, 1792, [], downsamples=(1,), mpp=1.0)
    with pytest.raises(InputError, match="no tissue found at 10x") as e:
        collect([tmp_path / "glass"], 32)
    assert e.value.path is not None and e.value.path.name.startswith("level-")
    fake = tmp_path / "plain.tif"
    fake.write_bytes(b"II*\x00" + b"\x00" * 100)
    with pytest.raises(InputError, match=r"not a whole-slide image OpenSlide can read|not a readable slide"):
        collect([fake], 32)


def test_rle_tiles_decode_through_pydicom(tmp_path):
    """Syntaxes Pillow does not read (RLE here) go through pydicom's decoders, one frame at a time."""
    from pydicom.uid import RLELossless

    tissue = [(0, 0, 896, 896)]
    (level,) = write_dicom_wsi(tmp_path, 1792, 896, tissue, downsamples=(1,), mpp=1.0, label=False)
    ds = dicom.read(level)
    ds.compress(RLELossless)
    ds.save_as(level)
    c = collect([level], 896)
    assert len(c.images) == 1 and np.array_equal(c.images[0].rgb, region(1, 0, 0, 896, 896, tissue))


def test_a_header_cannot_declare_more_frames_than_the_file_holds(tmp_path):
    (level,) = write_dicom_wsi(tmp_path, 1792, 896, [(0, 0, 896, 896)], downsamples=(1,), mpp=1.0, label=False)
    ds = dicom.read(level)
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = 10_000_000, 10_000_000
    ds.NumberOfFrames = 2_000_000_000
    ds.save_as(level)
    with pytest.raises(InputError, match=r"level-0\.dcm: declares 2,000,000,000 frames"):
        collect([level], 64)
