"""DICOM rendering against expectations computed here with pydicom's own LUT functions and numpy."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from medgemma_cli.errors import InputError
from medgemma_cli.inputs import dicom
from medgemma_cli.inputs.collect import collect


def data(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"{name} is not installed (pydicom-data is a test dependency)")
    return Path(path)


def render(*names: str) -> list[np.ndarray]:
    paths = [data(n) for n in names]
    (vol,) = dicom.assemble([(p, pydicom.dcmread(p)) for p in paths])
    return dicom.render_volume(vol)


def u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def test_ct_is_three_hounsfield_windows():
    ds = pydicom.dcmread(data("CT_small.dcm"))
    hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    expected = np.stack([u8((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255) for lo, hi in
                         [(-1024, 1024), (-135, 215), (0, 80)]], -1)
    (got,) = render("CT_small.dcm")
    assert np.array_equal(got, expected)


def test_mr_single_image_is_min_max_grey():
    ds = pydicom.dcmread(data("MR_small.dcm"))
    v = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    g = u8((v - v.min()) / (v.max() - v.min()) * 255)
    (got,) = render("MR_small.dcm")
    assert np.array_equal(got, np.stack([g, g, g], -1))


def test_multiframe_mr_is_a_volume_normalised_as_a_whole():
    ds = pydicom.dcmread(data("emri_small.dcm"))
    v = ds.pixel_array.astype(np.float64)
    expected = u8((v - v.min()) / (v.max() - v.min()) * 255)
    got = render("emri_small.dcm")
    assert len(got) == 10
    assert np.array_equal(np.stack([g[..., 0] for g in got]), expected)  # frames in file order
    c = collect([data("emri_small.dcm")], 32)
    assert [i.label for i in c.images] == [f"SLICE {n}" for n in range(1, 11)]


def test_monochrome1_chest_cr_windowed_and_inverted():
    ds = pydicom.dcmread(data("RG1_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    arr = apply_modality_lut(ds.pixel_array, ds)
    voi = apply_voi_lut(arr, ds, index=0).astype(np.float64)  # pydicom's windowing, to its output range
    bits = ds.BitsStored
    expected = 255 - u8(voi / (2**bits - 1) * 255)
    (got,) = render("RG1_UNCR.dcm")
    assert np.abs(got[..., 0].astype(int) - expected.astype(int)).max() <= 1
    assert (got[..., 0] == got[..., 2]).all()


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_the_window_follows_voi_lut_function(tmp_path, function):
    """SIGMOID keeps contrast beyond the window where LINEAR clips it; pydicom's windowing is the reference."""
    ds = pydicom.dcmread(data("RG1_UNCR.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword in ("VOILUTSequence", "WindowCenterWidthExplanation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 1200, 600, function
    ds.save_as(tmp_path / "cr.dcm")
    arr = apply_modality_lut(ds.pixel_array, ds)
    expected = u8(apply_voi_lut(arr, ds, index=0).astype(np.float64) / (2**ds.BitsStored - 1) * 255)
    got = dicom.render_2d(ds, ds.pixel_array)[..., 0]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    inside = (arr > 900) & (arr < 1500)
    beyond = arr > 1600
    assert inside.any() and beyond.any()
    if function == "SIGMOID":  # values past the window still differ from one another
        assert len(np.unique(got[beyond])) > 1
    else:
        assert (got[beyond] == 255).all()


def test_voi_lut_sequence():
    ds = pydicom.dcmread(data("vlut_04.dcm"))
    lut = apply_voi_lut(ds.pixel_array, ds).astype(np.float64)
    expected = u8(lut / (2 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1) * 255)
    (got,) = render("vlut_04.dcm")
    assert np.array_equal(got[..., 0], expected)


@pytest.mark.parametrize("compressed, reference", [
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),  # JPEG 2000 lossless
    ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ("emri_small_RLE.dcm", "emri_small.dcm"),
])
def test_lossless_transfer_syntaxes_render_identically(compressed, reference):
    a, b = render(compressed), render(reference)
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_jpeg_lossless_decodes():
    ds = pydicom.dcmread(data("JPGLosslessP14SV1_1s_1f_8b.dcm"))
    assert "Lossless" in ds.file_meta.TransferSyntaxUID.name
    (got,) = render("JPGLosslessP14SV1_1s_1f_8b.dcm")
    wc, ww = float(np.atleast_1d(ds.WindowCenter)[0]), float(np.atleast_1d(ds.WindowWidth)[0])
    x = ds.pixel_array.astype(np.float64)
    expected = np.where(x <= wc - 0.5 - (ww - 1) / 2, 0, np.where(x > wc - 0.5 + (ww - 1) / 2, 255,
                        ((x - (wc - 0.5)) / (ww - 1) + 0.5) * 255))
    assert np.array_equal(got[..., 0], u8(expected))


def test_jpeg_baseline_colour_is_close_to_the_uncompressed_original():
    (lossy,) = render("SC_rgb_jpeg_dcmtk.dcm")
    (orig,) = render("SC_rgb.dcm")
    assert lossy.shape == orig.shape and np.abs(lossy.astype(int) - orig.astype(int)).mean() < 4


def test_palette_colour():
    ds = pydicom.dcmread(data("OBXXXX1A.dcm"))
    rgb16 = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    expected = u8(rgb16 / 65535 * 255)
    (got,) = render("OBXXXX1A.dcm")
    assert np.array_equal(got, expected)


def test_ybr_full_422_becomes_rgb():
    ds = pydicom.dcmread(data("SC_ybr_full_422_uncompressed.dcm"))
    from pydicom.pixels import convert_color_space

    raw = pydicom.pixels.pixel_array(ds, as_rgb=False)
    expected = convert_color_space(raw, "YBR_FULL", "RGB")
    (got,) = render("SC_ybr_full_422_uncompressed.dcm")
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    (rgb,) = render("SC_rgb.dcm")
    assert np.abs(got.astype(int) - rgb.astype(int)).mean() < 3  # same picture as the RGB original


def _series(tmp_path: Path, n: int) -> list[Path]:
    """A CT series built from CT_small: each slice offset along the normal, constant HU per slice (but a corner),
    written under shuffled names with shuffled instance numbers."""
    base = pydicom.dcmread(data("CT_small.dcm"))
    normal = np.cross(np.array(base.ImageOrientationPatient[:3], float),
                      np.array(base.ImageOrientationPatient[3:], float))
    order = list(range(n))
    random.Random(1).shuffle(order)
    paths = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.ImagePositionPatient = [float(v) for v in np.array(base.ImagePositionPatient, float) + normal * 2.5 * i]
        ds.InstanceNumber = n - i  # deliberately disagrees with the geometry
        ds.SOPInstanceUID = f"{base.SOPInstanceUID}.{i}"
        arr = np.full(base.pixel_array.shape, 100 + 10 * i, dtype=base.pixel_array.dtype)
        arr[-4:, -4:] = 0  # one dark corner: a blank slice would be left out
        ds.PixelData = arr.tobytes()
        p = tmp_path / f"img{order[i]:03d}"
        ds.save_as(p)
        paths.append(p)
    return paths


def test_series_from_shuffled_slices_is_ordered_along_the_normal(tmp_path):
    _series(tmp_path, 12)
    c = collect([tmp_path], 16)
    assert [i.label for i in c.images] == [f"SLICE {k}" for k in range(1, 13)]
    ds = pydicom.dcmread(data("CT_small.dcm"))
    slope, icpt = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    reds = [int(i.rgb[0, 0, 0]) for i in c.images]  # constant slices survive resizing exactly
    expected = [int(u8((np.clip((100 + 10 * k) * slope + icpt, -1024, 1024) + 1024) / 2048 * 255)) for k in range(12)]
    assert reds == expected


def test_long_series_is_sampled_evenly(tmp_path):
    _series(tmp_path, 100)
    (vol,) = dicom.assemble([(p, pydicom.dcmread(p)) for p in sorted(tmp_path.iterdir())])
    assert vol.total_slices == 100 and len(vol.slices) == 85
    positions = [s.position for s in vol.slices]
    assert positions == sorted(positions)
    assert dicom.sample_evenly(100)[0] == 0 and dicom.sample_evenly(100)[-1] == 99


def test_structured_report_text_without_person_names():
    c = collect([data("test-SR.dcm")], 32)
    ((_name, text),) = c.notes
    ds = pydicom.dcmread(data("test-SR.dcm"))
    assert text and not c.images
    texts = [str(item.TextValue) for item in ds.ContentSequence if item.get("ValueType") == "TEXT"]
    for t in texts[:3]:
        assert t in text
    for item in ds.ContentSequence:
        if item.get("ValueType") == "PNAME":
            assert str(item.PersonName) not in text


@pytest.mark.parametrize("name, what", [("rtplan.dcm", "RT Plan"), ("waveform_ecg.dcm", "ECG")])
def test_non_image_objects_are_explained(name, what):
    with pytest.raises(InputError, match=what):
        collect([data(name)], 32)


def test_truncated_dicom_is_named(tmp_path):
    src = data("CT_small.dcm").read_bytes()
    bad = tmp_path / "cut.dcm"
    bad.write_bytes(src[: len(src) // 2])
    with pytest.raises(InputError, match=r"cut\.dcm"):
        collect([bad], 32)


def test_safe_metadata_has_no_identifiers():
    ds = pydicom.dcmread(data("CT_small.dcm"))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "ID-12345", "19500101"
    ds.PatientAge, ds.PatientSex = "072Y", "F"
    meta = dicom.safe_metadata(ds)
    assert meta["PatientAge"] == "072Y" and meta["PatientSex"] == "F" and meta["Modality"] == "CT"
    assert "Doe" not in str(meta) and "12345" not in str(meta) and "1950" not in str(meta)
