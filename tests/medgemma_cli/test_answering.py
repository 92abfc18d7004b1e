"""`medgemma ask` end to end on the tiny model: prompt contents, JSON, parity of what the model sees, errors."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medgemma_cli.answering import AskOptions, ask
from medgemma_cli.errors import InputError, MedgemmaError
from medgemma_cli.inputs.collect import collect
from medgemma_cli.inputs.images import resize_square
from medgemma_cli.prompt import build_messages

pytestmark = pytest.mark.slow
CT = Path(get_testdata_file("CT_small.dcm", download=False))
EMRI = Path(get_testdata_file("emri_small.dcm", download=False))


def test_ask_dicom_and_note(model, note, tmp_path):
    streamed = []
    r = ask("Describe the findings.", [CT, note], model=model,
            options=AskOptions(max_tokens=12, save_input=tmp_path / "seen"), on_text=streamed.append)
    assert r.images_sent == 1 and r.tokens["completion"] > 0 and r.tokens["prompt"] > 20
    assert r.answer == "".join(streamed).strip()
    kinds = {Path(i["path"]).name: i["kind"] for i in r.inputs}
    assert kinds == {"CT_small.dcm": "dicom", "note.txt": "note"}
    assert all(len(i["sha256"]) == 64 for i in r.inputs)
    from PIL import Image

    seen = np.asarray(Image.open(r.saved_inputs[0]))
    assert seen.shape == (32, 32, 3)
    expected = resize_square(collect([CT], None if False else 32).images[0].rgb, 32)
    assert np.array_equal(seen, expected)
    again = ask("Describe the findings.", [CT, note], model=model, options=AskOptions(max_tokens=12))
    assert again.answer == r.answer  # greedy


def test_json_from_the_command_line(model, note, tmp_path):
    env = {**os.environ, "MEDGEMMA_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "medgemma_cli", "ask", "Describe.", str(CT), str(note), "--model",
                           str(model), "--max-tokens", "8", "--json"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert set(r) >= {"answer", "model", "inputs", "images_sent", "tokens", "timings", "warnings", "stopped"}
    assert r["timings"]["first_token_s"] > 0 and r["timings"]["image_encode_s"] > 0
    # libmtmd's prompt log stays silent
    assert "add_text" not in proc.stderr and note.read_text().strip() not in proc.stderr


def test_metadata_only_safe_fields(model, tmp_path):
    ds = pydicom.dcmread(CT)
    ds = copy.deepcopy(ds)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientAge = "Doe^Jane", "MRN-998877", "19500101", "072Y"
    p = tmp_path / "phi.dcm"
    ds.save_as(p)
    inputs = collect([p], 32)
    text = json.dumps(build_messages("Q?", inputs, with_metadata=True))
    assert "Modality: CT" in text and "PatientAge: 072Y" in text
    assert "Doe" not in text and "998877" not in text and "1950" not in text
    r = ask("Q?", [p], model=model, options=AskOptions(max_tokens=4, with_metadata=True))
    assert "Doe" not in json.dumps(r.as_dict()) and "998877" not in json.dumps(r.as_dict())


def test_too_many_slices_for_the_context_are_resampled(model):
    r = ask("Q?", [EMRI], model=model, options=AskOptions(max_tokens=8, ctx=160))
    assert r.images_sent < 10
    assert any("slices sent" in w for w in r.warnings)


def test_long_notes_are_truncated_visibly(model, tmp_path):
    long_note = tmp_path / "long.txt"
    long_note.write_text("the patient presents with cough and fever. " * 400)
    r = ask("Q?", [long_note], model=model, options=AskOptions(max_tokens=8, ctx=512))
    assert any("notes did not fit" in w for w in r.warnings)
    assert r.tokens["prompt"] + r.tokens["completion"] <= 512


def test_text_only_question(model):
    r = ask("What is pleural effusion?", [], model=model, options=AskOptions(max_tokens=6))
    assert r.images_sent == 0 and r.inputs == [] and r.tokens["completion"] > 0


def test_errors(model, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEMMA_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(MedgemmaError, match="medgemma convert"):
        ask("Q?", [CT])
    with pytest.raises(InputError, match="no such file"):
        ask("Q?", [tmp_path / "missing.dcm"], model=model)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01" * 100)
    with pytest.raises(InputError, match=r"junk\.bin: not a DICOM file"):
        ask("Q?", [junk], model=model)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    with pytest.raises(InputError, match=r"fake\.png: not a readable image"):
        ask("Q?", [fake], model=model)
    with pytest.raises(MedgemmaError, match="question is empty"):
        ask("  ", [CT], model=model)
    with pytest.raises(InputError, match="RT Plan"):
        ask("Q?", [Path(get_testdata_file("rtplan.dcm", download=False))], model=model)


def test_cli_error_is_one_line(model, tmp_path):
    env = {**os.environ, "MEDGEMMA_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "medgemma_cli", "ask", "Q?", str(tmp_path / "nope.dcm"), "--model",
                           str(model)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: {tmp_path / 'nope.dcm'}: no such file or folder"]


def _minimal_pdf(text: str) -> bytes:
    """A one-page PDF with a text layer, written by hand (offsets computed)."""
    stream = f"BT /F1 12 Tf 20 100 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def test_pdf_note(model, tmp_path):
    pdf = tmp_path / "discharge.pdf"
    pdf.write_bytes(_minimal_pdf("Discharge summary: stable, afebrile."))
    inputs = collect([pdf], 32)
    assert inputs.notes and "Discharge summary" in inputs.notes[0][1]
    r = ask("Summarise.", [pdf], model=model, options=AskOptions(max_tokens=4))
    assert r.inputs[0]["kind"] == "document" and r.images_sent == 1  # the text layer and the page's picture


def test_models_from_elsewhere_and_from_the_store(model, tmp_path, monkeypatch):
    r = ask("Describe.", [CT], gguf=model / "text.gguf", mmproj=model / "mmproj.gguf", options=AskOptions(max_tokens=4))
    assert r.images_sent == 1 and r.model["mmproj"].endswith("mmproj.gguf")
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    import shutil

    shutil.copytree(model, home / "models" / "tiny-q8")
    monkeypatch.setenv("MEDGEMMA_HOME", str(home))
    r = ask("Describe.", [CT], options=AskOptions(max_tokens=4))  # no --model: the store's newest
    assert r.model["name"] == "tiny-q8"
    with pytest.raises(MedgemmaError, match=r"images need a vision projector|no vision projector"):
        ask("Describe.", [CT], gguf=model / "text.gguf", options=AskOptions(max_tokens=4))
