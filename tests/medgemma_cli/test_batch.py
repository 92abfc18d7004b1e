"""`medgemma batch` (local mode): walking a messy folder, units, records, resume after SIGKILL, no PHI."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medgemma_cli.answering import AskOptions
from medgemma_cli.batch import make_units, run_batch, walk

pytestmark = pytest.mark.slow


def data(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def _ct_series(folder: Path, n: int, series_uid: str, phi: bool = False) -> None:
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


@pytest.fixture
def messy(tmp_path) -> Path:
    root = tmp_path / "night"
    (root / "ct").mkdir(parents=True)
    _ct_series(root / "ct", 6, "1.2.826.0.1.3680043.99.1")
    (root / "mr").mkdir()
    (root / "mr" / "IM0001").write_bytes(data("MR_small.dcm").read_bytes())  # no extension: found by content
    (root / "cine").mkdir()
    (root / "cine" / "multi.dcm").write_bytes(data("emri_small.dcm").read_bytes())
    Image.fromarray(np.full((20, 30, 3), 120, np.uint8)).save(root / "photo.png")
    Image.fromarray(np.full((20, 30, 3), 60, np.uint8)).save(root / "scan.jpg")
    full = data("CT_small.dcm").read_bytes()
    (root / "broken.dcm").write_bytes(full[: len(full) - 20000])  # header intact, pixels cut
    (root / "notdicom.dcm").write_text("hello")
    (root / "empty.dcm").write_bytes(b"")
    os.symlink(root, root / "ct" / "loop")
    return root


def test_walk_and_units(messy):
    w = walk(messy)
    skipped = dict(w.skipped)
    assert skipped["notdicom.dcm"].startswith("not DICOM") and skipped["empty.dcm"] == "empty file"
    assert any("loop" in path for path in skipped)
    units = make_units(messy, w.files, "series")
    sizes = sorted(len(u.files) for u in units)
    assert sizes == [1, 1, 1, 1, 1, 6]  # CT series, MR, multi-frame, broken CT, png, jpg
    assert len(make_units(messy, w.files, "file")) == 11


def test_batch_records_and_errors(messy, convert_tiny, tmp_path):
    out = tmp_path / "results.jsonl"
    s = run_batch(messy, ["Any findings?", "Heart size?"], out, model=convert_tiny("Q8_0"),
                  options=AskOptions(max_tokens=4))
    lines = out.read_text().splitlines()
    records = [json.loads(ln) for ln in lines]
    assert len(records) == 6 * 2 and s.records_written == 12 and s.failed == 1
    by_files = {tuple(r["files"]): r for r in records if r["question"] == "Any findings?"}
    ct = next(r for k, r in by_files.items() if len(k) == 6)
    assert ct["images_sent"] == 6 and ct["modality"] == "CT" and ct["unit"] == "1.2.826.0.1.3680043.99.1"
    assert by_files[("cine/multi.dcm",)]["images_sent"] == 10
    broken = by_files[("broken.dcm",)]
    assert broken["answer"] is None and "broken.dcm" in broken["error"]
    again = run_batch(messy, ["Any findings?", "Heart size?"], out, model=convert_tiny("Q8_0"),
                      options=AskOptions(max_tokens=4))
    assert again.records_written == 0 and again.done_before == 12 and len(out.read_text().splitlines()) == 12
    more = run_batch(messy, ["Any findings?", "Is there an effusion?"], out, model=convert_tiny("Q8_0"),
                     options=AskOptions(max_tokens=4))
    assert more.records_written == 6  # only the new question; a changed question never reuses answers


def test_csv_format(messy, convert_tiny, tmp_path):
    import pandas as pd

    out = tmp_path / "results.csv"
    run_batch(messy, ["Q?"], out, fmt="csv", model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=3))
    df = pd.read_csv(out)
    assert len(df) == 6 and set(df.columns) >= {"unit", "files", "question", "answer", "error"}


def test_no_phi_unless_asked(tmp_path, convert_tiny):
    root = tmp_path / "phi"
    root.mkdir()
    _ct_series(root, 3, "1.2.826.0.1.3680043.99.7", phi=True)
    out = tmp_path / "r.jsonl"
    env = {**os.environ, "MEDGEMMA_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "medgemma_cli", "batch", str(root), "-q", "Findings?", "--out", str(out),
           "--model", str(convert_tiny("Q8_0")), "--max-tokens", "3", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    text = out.read_text() + r.stdout + r.stderr
    assert "Roe" not in text and "424242" not in text and "20240102" not in text
    out2 = tmp_path / "r2.jsonl"
    r = subprocess.run(cmd[:8] + [str(out2)] + cmd[9:] + ["--include-phi"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and "Roe^Richard" in out2.read_text()


def test_kill_and_resume(tmp_path, convert_tiny):
    """SIGKILL the batch at random moments, re-run: exactly one record per (unit, question), no torn line."""
    root = tmp_path / "many"
    root.mkdir()
    n = 24
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), i * 10, np.uint8)).save(root / f"img{i:02d}.png")
    out = tmp_path / "r.jsonl"
    env = {**os.environ, "MEDGEMMA_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "medgemma_cli", "batch", str(root), "-q", "A?", "-q", "B?", "--out", str(out),
           "--model", str(convert_tiny("Q8_0")), "--max-tokens", "400", "--ctx", "1024", "--quiet"]
    rng = random.Random(4)
    partial = []
    for _ in range(4):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
        time.sleep(rng.uniform(1.0, 3.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        partial.append(len(out.read_bytes().splitlines()) if out.exists() else 0)
    assert any(0 < k < n * 2 for k in partial), partial  # the kills did land mid-run
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    keys = [(rec["unit"], rec["question"]) for rec in map(json.loads, out.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == n * 2


def test_html_report(messy, convert_tiny, tmp_path):
    """The report is one self-contained file: each unit's thumbnail decodes as an image, answers and errors are
    there and escaped, and nothing is fetched from elsewhere."""
    import base64
    import io
    from html.parser import HTMLParser

    from medgemma_cli.report import write_report

    out = tmp_path / "r.jsonl"
    run_batch(messy, ["Size <5 mm & shape?"], out, model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=4))
    report = write_report(out, tmp_path / "review.html")
    page = report.read_text()

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.imgs, self.sections, self.external = [], 0, []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "img":
                self.imgs.append(a["src"])
            if tag == "section":
                self.sections += 1
            for key in ("src", "href"):
                if a.get(key, "").startswith(("http:", "https:", "//")):
                    self.external.append(a[key])

    c = Collect()
    c.feed(page)
    assert c.sections == 6 and not c.external
    assert len(c.imgs) == 5  # every unit but the broken one has what the model saw
    for src in c.imgs:
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.height == 160 and img.width % 160 == 0
    assert "Size &lt;5 mm &amp; shape?" in page and "<5 mm" not in page
    assert page.count('class="unit err"') == 1 and "broken.dcm" in page
