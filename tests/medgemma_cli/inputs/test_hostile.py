"""The hostile and broken inputs of issue #13, one by one: each is either read, with what was changed said out
loud, or refused with one line naming the file; never a crash elsewhere, never a blank or missing image sent."""

from __future__ import annotations

import copy
import io
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from medgemma_cli.batch.units import make_units
from medgemma_cli.errors import InputError
from medgemma_cli.inputs.collect import collect
from medgemma_cli.inputs.notes import decode_text, read_note
from medgemma_cli.inputs.walk import IMAGE_INPUTS, walk
from medgemma_cli.printable import printable
from medgemma_cli.testing import fuzz as fuzzing


def data(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def _with_raw(name: str, path: Path, **raw: bytes) -> Path:
    """A copy of a pydicom test file with elements written as raw bytes (values pydicom would not write)."""
    ds = pydicom.dcmread(data(name))
    for keyword, value in raw.items():
        tag = Tag(keyword)
        vr = pydicom.datadict.dictionary_VR(tag)
        ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    ds.save_as(path, enforce_file_format=False)
    return path


# ---------------------------------------------------------------- sizes that lie


def test_an_element_declaring_gigabytes_is_an_error_not_an_allocation(tmp_path):
    raw = bytearray(data("CT_small.dcm").read_bytes())
    at = raw.find(b"\x08\x00\x60\x00CS")  # Modality, explicit VR: its 2-byte length becomes...
    assert at > 0
    raw[at:at + 8] = b"\x08\x00\x60\x00UN\x00\x00"  # ...an UN element, whose 4-byte length follows
    raw[at + 8:at + 8] = struct.pack("<I", 0xFFFFFFF0)
    with fuzzing.Fuzzer(tmp_path / "fuzz") as f:  # read in a child with 1 GB of address space
        r = f.run(fuzzing.Case("dicom", 0, [("liar.dcm", bytes(raw))]))
    assert not r["faults"], r
    assert r["ask"]["status"] == "refused" and "declares 4,294,967,280 bytes" in r["ask"]["message"], r["ask"]


# ---------------------------------------------------------------- never a blank or missing image


@pytest.mark.parametrize("slope", [b"NaN ", b"1e308 ", b"inf "])
def test_a_rescale_beyond_floating_point_is_an_error(tmp_path, slope):
    bad = _with_raw("CT_small.dcm", tmp_path / "slope.dcm", RescaleSlope=slope)
    with pytest.raises(InputError, match=r"slope\.dcm: .*RescaleSlope"):
        collect([bad], 32)


def test_an_unusable_window_falls_back_to_the_full_range_and_says_so(tmp_path):
    odd = _with_raw("CT_small.dcm", tmp_path / "win.dcm", Modality=b"OT", WindowCenter=b"NaN ",
                    WindowWidth=b"400 ")
    c = collect([odd], 32)
    assert len(c.images) == 1 and int(np.ptp(c.images[0].rgb)) > 0
    assert any("win.dcm" in w and "full range" in w for w in c.warnings), c.warnings


def test_a_window_that_shows_one_flat_value_falls_back(tmp_path):
    odd = _with_raw("CT_small.dcm", tmp_path / "far.dcm", Modality=b"OT", WindowCenter=b"90000 ",
                    WindowWidth=b"10 ")
    c = collect([odd], 32)
    assert int(np.ptp(c.images[0].rgb)) > 0
    assert any("one flat value" in w for w in c.warnings), c.warnings


def test_a_blank_image_is_an_error(tmp_path):
    ds = pydicom.dcmread(data("MR_small.dcm"))
    ds.PixelData = np.full(ds.pixel_array.shape, 7, ds.pixel_array.dtype).tobytes()
    ds.save_as(tmp_path / "blank.dcm")
    with pytest.raises(InputError, match=r"blank\.dcm: the image is blank"):
        collect([tmp_path / "blank.dcm"], 32)
    from PIL import Image

    Image.new("L", (40, 30), 128).save(tmp_path / "grey.png")
    with pytest.raises(InputError, match=r"grey\.png: the image is blank"):
        collect([tmp_path / "grey.png"], 32)


# ---------------------------------------------------------------- one file never ends a batch


def _series(folder: Path, n: int = 4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(data("CT_small.dcm"))
    paths = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * i]
        ds.SOPInstanceUID = f"{base.SOPInstanceUID}.{i}"
        ds.save_as(folder / f"s{i}.dcm")
        paths.append(folder / f"s{i}.dcm")
    return paths


@pytest.mark.parametrize("element", [dict(InstanceNumber=b"1A"), dict(ImagePositionPatient=b"1\\2 "),
                                     dict(ImageOrientationPatient=b"a\\b\\c\\d\\e\\f ")])
def test_one_unorderable_slice_is_left_out_of_its_series_and_said(tmp_path, element):
    paths = _series(tmp_path / "ct")
    buf = io.BytesIO()
    ds = pydicom.dcmread(paths[2])
    for keyword, value in element.items():
        tag = Tag(keyword)
        ds._dict[tag] = RawDataElement(tag, pydicom.datadict.dictionary_VR(tag), len(value), value, 0, False, True)
    ds.save_as(buf, enforce_file_format=False)
    paths[2].write_bytes(buf.getvalue())
    c = collect([tmp_path / "ct"], 32)
    assert len(c.images) == 3 and "s2.dcm" not in {img.source.name for img in c.images}
    assert any(w.startswith("s2.dcm left out of its series") for w in c.warnings), c.warnings
    alone = collect([paths[2]], 32)  # a lone file needs no order: the same fault does not matter
    assert len(alone.images) == 1


def test_an_undecodable_slice_is_left_out_of_its_series(tmp_path):
    paths = _series(tmp_path / "ct")
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(paths[1])
    c = collect([tmp_path / "ct"], 32)
    assert len(c.images) == 3 and any("s1.dcm" in w for w in c.warnings)


def test_header_failures_while_grouping_never_end_the_batch(tmp_path):
    paths = _series(tmp_path / "ct", 3)
    _with_raw("CT_small.dcm", tmp_path / "ct" / "frames.dcm", NumberOfFrames=b"1A")
    paths[0].write_bytes(paths[0].read_bytes()[:300])  # the header cut short
    w = walk(tmp_path / "ct", IMAGE_INPUTS)
    for unit in ("series", "study", "file"):
        units = make_units(tmp_path / "ct", w.files, unit)
        assert sorted(f.name for u in units for f in u.files) == ["frames.dcm", "s0.dcm", "s1.dcm", "s2.dcm"]
        refused, sent = [], 0
        for u in units:
            try:
                sent += len(collect(u.files, 32).images)
            except InputError as e:
                refused.append(e.path.name)
        assert sent >= 2 and set(refused) <= {"s0.dcm", "frames.dcm"}, (unit, refused, sent)


def test_a_file_unit_is_one_file_even_when_copies_share_an_instance_uid(tmp_path):
    folder = tmp_path / "copies"
    folder.mkdir()
    shutil.copy(data("CT_small.dcm"), folder / "a.dcm")
    shutil.copy(data("CT_small.dcm"), folder / "b.dcm")
    units = make_units(folder, walk(folder, IMAGE_INPUTS).files, "file")
    assert sorted(len(u.files) for u in units) == [1, 1] and len({u.id for u in units}) == 2


def test_a_file_name_that_is_not_utf8_is_read_and_shown_escaped(tmp_path):
    folder = tmp_path / "names"
    folder.mkdir()
    odd = Path(os.fsdecode(bytes(folder) + b"/caf\xe9 \x1b[31m[red].dcm"))
    shutil.copy(data("CT_small.dcm"), odd)
    units = make_units(folder, walk(folder, IMAGE_INPUTS).files, "series")
    assert len(units) == 1 and units[0].files == [odd]
    assert len(collect([odd], 32).images) == 1
    shown = printable(odd.name)
    assert shown == "caf\\xe9 \\x1b[31m[red].dcm"
    shown.encode("utf-8")  # printable to any terminal, and no raw escape sequence in it
    with pytest.raises(InputError) as e:
        collect([odd.with_name(odd.name + ".missing")], 32)
    assert "\x1b" not in str(e.value) and "\\xe9" in str(e.value)


# ---------------------------------------------------------------- pydicom's own broken files, SR, PDF


@pytest.mark.parametrize("name", ["badVR.dcm", "meta_missing_tsyntax.dcm", "no_meta.dcm",
                                  "rtplan_truncated.dcm"])
def test_pydicoms_malformed_files_are_named(name):
    try:
        path = data(name)
    except (TypeError, FileNotFoundError):
        pytest.skip(f"{name} is not in this pydicom")
    try:
        c = collect([path], 32)
    except InputError as e:
        assert e.path == path and name in str(e)
    else:
        assert c.images or c.notes


def test_a_structured_report_missing_meanings_and_units_still_reads(tmp_path):
    ds = pydicom.dcmread(data("test-SR.dcm"))
    for item in ds.ContentSequence:
        for seq in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            if seq in item:
                del item[seq][0].CodeMeaning
    ds.save_as(tmp_path / "sr.dcm")
    c = collect([tmp_path / "sr.dcm"], None)
    assert c.notes and c.notes[0][0] == "sr.dcm"


def test_an_encrypted_pdf_is_named(tmp_path):
    """AES needs the `cryptography` package, which pypdf does not bring: its DependencyError names the file."""
    encrypt = (b"<< /Filter /Standard /V 5 /R 6 /Length 256 /P -4 /O <" + b"11" * 48 + b"> /U <" + b"22" * 48
               + b"> /OE <" + b"33" * 32 + b"> /UE <" + b"44" * 32 + b"> /Perms <" + b"55" * 16 + b"> >>")
    pdf = fuzzing.minimal_pdf("Hb 13.2").replace(b"/Root 1 0 R >>", b"/Root 1 0 R /Encrypt " + encrypt + b" >>")
    (tmp_path / "locked.pdf").write_bytes(pdf)
    with pytest.raises(InputError, match=r"locked\.pdf: "):
        collect([tmp_path / "locked.pdf"], None)


# ---------------------------------------------------------------- text as text


TEXT = "Indentation:\n    if x:\n\treturn y\nÜnïcödé — ½ ° µ 日本語"


@pytest.mark.parametrize("encoding,bom", [("utf-16-le", b"\xff\xfe"), ("utf-16-be", b"\xfe\xff"),
                                          ("utf-8", b"\xef\xbb\xbf"), ("utf-32-le", b"\xff\xfe\x00\x00"),
                                          ("utf-16-le", b""), ("utf-16-be", b"")])
def test_unicode_notes_decode_exactly(tmp_path, encoding, bom):
    note = tmp_path / "n.txt"
    note.write_bytes(bom + TEXT.encode(encoding))
    got = read_note(note)
    assert got.text == TEXT.strip()
    assert not any("could not be decoded" in w for w in got.warnings)


def test_a_legacy_encoding_is_guessed_and_said(tmp_path):
    text = "所見：胸部単純写真で異常陰影を認めない。心胸郭比は正常範囲内。" * 4
    note = tmp_path / "sjis.txt"
    note.write_bytes(text.encode("shift_jis"))
    got = read_note(note)
    assert got.text == text
    assert any("a guess" in w for w in got.warnings)


def test_invalid_utf8_is_decoded_lossily_and_said():
    note = decode_text("Hb 13.2 g/dL, fièvre".encode() + b"\xff\xfe\xfa")
    assert note is not None and any("a guess" in w for w in note.warnings)
    assert "Hb 13.2 g/dL" in note.text


def test_a_budget_that_cuts_a_character_in_two_loses_only_that_character(tmp_path):
    note = tmp_path / "cut.txt"
    note.write_bytes("é".encode() * 1000)
    got = read_note(note, budget=1001)
    assert got.text.startswith("é" * 500) and "\ufffd" not in got.text
    assert any("only the first 1,001 bytes" in w for w in got.warnings)


def test_binary_is_still_refused(tmp_path):
    note = tmp_path / "bin.txt"
    note.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match=r"bin\.txt: looks binary"):
        read_note(note)
