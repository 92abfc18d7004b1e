"""`medgemma batch`: walking a messy folder, units, records, resume after SIGKILL, no PHI, the HTML report,
MedSigLIP labels, and `--server` against llama-cpp-python's real server."""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
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
from medgemma_cli.batch import make_units, pseudonym, run_batch, unit_id_key, walk
from pictures import picture

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
    Image.fromarray(picture(20, 30, 120)).save(root / "photo.png")
    Image.fromarray(picture(20, 30, 60)).save(root / "scan.jpg")
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
    assert ct["images_sent"] == 6 and ct["modality"] == "CT"
    # the unit id is a keyed hash of the series UID (the key beside the results), never the UID itself
    assert ct["unit"] == pseudonym(unit_id_key(out), "1.2.826.0.1.3680043.99.1")
    assert "1.2.826" not in out.read_text()
    assert by_files[("cine/multi.dcm",)]["images_sent"] == 10
    broken = by_files[("broken.dcm",)]
    assert broken["answer"] is None and "broken.dcm" in broken["error"]
    again = run_batch(messy, ["Any findings?", "Heart size?"], out, model=convert_tiny("Q8_0"),
                      options=AskOptions(max_tokens=4))
    assert again.records_written == 0 and again.done_before == 12 and len(out.read_text().splitlines()) == 12
    more = run_batch(messy, ["Any findings?", "Is there an effusion?"], out, model=convert_tiny("Q8_0"),
                     options=AskOptions(max_tokens=4))
    assert more.records_written == 6  # only the new question; a changed question never reuses answers


def test_study_unit_shares_the_context(tmp_path, convert_tiny):
    """--unit study puts every series of a study in one prompt; when they do not all fit, each series is
    sampled evenly and together they fill the context: none is dropped, nothing overflows."""
    root = tmp_path / "study"
    for k, n in enumerate((20, 20, 1)):
        (root / f"s{k}").mkdir(parents=True)
        _ct_series(root / f"s{k}", n, f"1.2.826.0.1.3680043.99.5{k}")
    for f in root.rglob("*.dcm"):  # one study
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.99.500"
        ds.save_as(f)
    out = tmp_path / "r.jsonl"
    # tiny model: 4 image tokens + 8 per slice; (1024 - 4 - 512) // 12 = 42 slices fit
    s = run_batch(root, ["Findings?"], out, unit="study", model=convert_tiny("Q8_0"),
                  options=AskOptions(max_tokens=4, ctx=1024))
    (record,) = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert s.failed == 0 and record["error"] is None and record["unit_kind"] == "study"
    assert len(record["files"]) == 41 and record["images_sent"] == 1 + 20 + 20  # all fit: 41 ≤ 42
    s = run_batch(root, ["Findings?"], tmp_path / "r2.jsonl", unit="study", model=convert_tiny("Q8_0"),
                  options=AskOptions(max_tokens=4, ctx=800))  # (800 - 4 - 512) // 12 = 23 slices
    (record,) = [json.loads(ln) for ln in (tmp_path / "r2.jsonl").read_text().splitlines()]
    assert record["error"] is None and record["images_sent"] == 1 + 11 + 11


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
    r = subprocess.run([*cmd[:8], str(out2), *cmd[9:], "--include-phi"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and "Roe^Richard" in out2.read_text()


def test_retry_failed(messy, convert_tiny, tmp_path):
    """--retry-failed removes the error records and tries those units again: still one record per question."""
    out = tmp_path / "r.jsonl"
    opts = AskOptions(max_tokens=3)
    first = run_batch(messy, ["Findings?"], out, model=convert_tiny("Q8_0"), options=opts)
    assert first.failed == 1
    (messy / "broken.dcm").write_bytes(data("CT_small.dcm").read_bytes())  # the file was fixed since
    assert run_batch(messy, ["Findings?"], out, model=convert_tiny("Q8_0"), options=opts).records_written == 0
    again = run_batch(messy, ["Findings?"], out, model=convert_tiny("Q8_0"), options=opts, retry_failed=True)
    assert again.retried == 1 and again.records_written == 1 and again.failed == 0
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(records) == 6 and len({r["unit"] for r in records}) == 6 and not any(r["error"] for r in records)


def test_csv_torn_row_with_newlines_is_cut_whole(tmp_path):
    """A CSV answer may hold newlines and quotes; a row cut anywhere inside is removed whole on reopening."""
    from medgemma_cli.batch import RecordFile

    path = tmp_path / "r.csv"
    rec = {"unit": "u1", "unit_kind": "file", "files": ["a.png"], "modality": "", "images_sent": 1,
           "question": "Q?", "answer": "one", "error": None, "model": "m", "run_key": "k"}
    f = RecordFile(path, "csv")
    f.append(rec)
    f.append({**rec, "unit": "u2", "answer": 'line 1\nline "2"\nline 3'})
    f.close()
    full = path.read_bytes()
    whole_first = len(full.split(b"\n", 2)[0]) + len(full.split(b"\n", 2)[1]) + 2  # header + first row
    for cut in (full.index(b"line 1\n") + 7, full.index(b'"2"'), len(full) - 1):
        path.write_bytes(full[:cut])
        again = RecordFile(path, "csv")
        again.close()
        assert again.done == {("u1", "k")} and path.read_bytes() == full[:whole_first], cut


def test_kill_and_resume(tmp_path, convert_tiny):
    """SIGKILL the batch at random moments, re-run: exactly one record per (unit, question), no torn line."""
    root = tmp_path / "many"
    root.mkdir()
    n = 24
    for i in range(n):
        Image.fromarray(picture(16, 16, i * 10)).save(root / f"img{i:02d}.png")
    out = tmp_path / "r.jsonl"
    env = {**os.environ, "MEDGEMMA_HOME": str(tmp_path / "home")}
    cmd = [sys.executable, "-m", "medgemma_cli", "batch", str(root), "-q", "A?", "-q", "B?", "--out", str(out),
           "--model", str(convert_tiny("Q8_0")), "--max-tokens", "100", "--ctx", "1024", "--quiet"]
    rng = random.Random(4)
    partial = []
    for _ in range(4):
        before = len(out.read_bytes().splitlines()) if out.exists() else 0
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
        deadline = time.monotonic() + 120  # a loaded machine is slow to its first answer: wait for one
        while time.monotonic() < deadline and p.poll() is None and (
                not out.exists() or len(out.read_bytes().splitlines()) <= before):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
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


# --- --classify: MedSigLIP probabilities per unit -------------------------------------------------------------

@pytest.fixture(scope="module")
def siglip_fp32(siglip_ckpt, tmp_path_factory) -> Path:
    from medgemma_cli.conversion import convert

    return convert(siglip_ckpt, tmp_path_factory.mktemp("siglip-batch") / "fp32", preset="fp32").path


def test_classify_adds_probabilities(messy, convert_tiny, siglip_fp32, tmp_path):
    """Each record carries the mean and max over the slices the model saw, equal to `classify` on those files
    (MedSigLIP's own recipe on the full rendering, not the model's resized square)."""
    from medgemma_cli.batch import ClassifyOptions
    from medgemma_cli.report import write_report
    from medgemma_cli.siglip import classify

    labels = ["pleural effusion", "no finding"]
    out = tmp_path / "r.jsonl"
    run_batch(messy, ["Findings?"], out, model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=3),
              classify=ClassifyOptions(labels, siglip_fp32))
    records = {tuple(r["files"]): r for r in map(json.loads, out.read_text().splitlines())}
    png = records[("photo.png",)]["classify"]
    ref = classify([messy / "photo.png"], labels, model=siglip_fp32)[0].scores
    assert png["images"] == 1 and set(png["mean"]) == set(labels)
    for lb in labels:
        assert abs(png["mean"][lb] - ref[lb]) < 1e-4 and png["max"][lb] == png["mean"][lb]
    ct_files = next(k for k in records if len(k) == 6)
    ct = records[ct_files]["classify"]
    per_slice = classify([messy / f for f in ct_files], labels, model=siglip_fp32)
    assert ct["images"] == 6
    for lb in labels:
        values = [r.scores[lb] for r in per_slice]
        assert abs(ct["mean"][lb] - float(np.mean(values))) < 1e-4 and abs(ct["max"][lb] - max(values)) < 1e-4
        assert 0.0 < ct["mean"][lb] < 1.0
    assert "classify" not in records[("broken.dcm",)]
    page = write_report(out, tmp_path / "review.html").read_text()
    assert "pleural effusion" in page and f"{png['mean']['pleural effusion']:.3f}" in page
    changed = run_batch(messy, ["Findings?"], out, model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=3),
                        classify=ClassifyOptions(["pneumothorax"], siglip_fp32))
    assert changed.records_written == 6  # other labels: new records, old ones are not reused


# --- --server: llama-cpp-python's own OpenAI-compatible server, started here on 127.0.0.1 ----------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# llama-cpp-python's server, with this machine's extra-buffer verdict applied to its model loads (AMX)
SERVE_WITH_VERDICT = ("from medgemma_cli.llama_loader import apply_to_process; apply_to_process(); import runpy; "
                      "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """`python -m llama_cpp.server` with a tiny converted MedGemma (text + mmproj, chat format mtmd)."""
    import urllib.request

    from medgemma_cli.conversion import convert
    from medgemma_cli.synthetic import make_checkpoint

    root = tmp_path_factory.mktemp("served")
    # llama-cpp-python's server fails ("failed to find a memory slot") once the prompt outgrows a 16-token
    # sliding window; MedGemma's window is 1024, so the served tiny model gets 512.
    ckpt = make_checkpoint(root / "ckpt", "tiny", sliding_window=512)
    model = convert(ckpt, root / "model", preset="F16", vision_onnx="none").path
    port = _free_port()
    log_path = root / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 - the server writes to it until the fixture ends
    proc = subprocess.Popen([sys.executable, "-c", SERVE_WITH_VERDICT, "--model", str(model / "text.gguf"),
                             "--clip_model_path", str(model / "mmproj.gguf"), "--chat_format", "mtmd",
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--verbose", "true"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                served = json.loads(r.read())["data"][0]["id"]
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the llama-cpp-python server did not start:\n"
                                   + log_path.read_text()[-3000:]) from None
            time.sleep(0.3)
    yield {"url": url, "model": served, "log": log_path}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _server(llama_server, workers: int = 1):
    from medgemma_cli.batch import ServerOptions

    return ServerOptions(llama_server["url"] + "/v1", workers=workers, image_size=32, image_tokens=4)


@pytest.mark.uses_network
def test_server_batch(messy, llama_server, tmp_path):
    """The same units and records as locally, answered by the server; more workers change nothing but speed."""
    questions = ["Is there a pleural effusion?", "Any findings?"]
    out1 = tmp_path / "w1.jsonl"
    s = run_batch(messy, questions, out1, server=_server(llama_server), options=AskOptions(max_tokens=8))
    records = [json.loads(ln) for ln in out1.read_text().splitlines()]
    assert len(records) == 12 and s.failed == 1 and s.model == llama_server["model"]
    good = [r for r in records if r["error"] is None]
    assert len(good) == 10
    for r in good:
        assert isinstance(r["answer"], str) and r["model"] == llama_server["model"]
        # the images reached the model: 4 embeddings each, plus the text
        assert r["tokens"]["prompt"] >= 4 * r["images_sent"] + 10
    by_files = {tuple(r["files"]): r for r in good if r["question"] == questions[0]}
    assert by_files[("cine/multi.dcm",)]["images_sent"] == 10
    assert next(r for k, r in by_files.items() if len(k) == 6)["images_sent"] == 6
    broken = [r for r in records if r["error"]]
    assert {tuple(r["files"]) for r in broken} == {("broken.dcm",)}

    out3 = tmp_path / "w3.jsonl"
    s3 = run_batch(messy, questions, out3, server=_server(llama_server, workers=3), options=AskOptions(max_tokens=8))
    assert s3.records_written == 12
    # (each results file has its own unit-id key, so units are matched by their files)
    answers = {(tuple(r["files"]), r["question"]): r["answer"] for r in map(json.loads, out1.read_text().splitlines())}
    answers3 = {(tuple(r["files"]), r["question"]): r["answer"]
                for r in map(json.loads, out3.read_text().splitlines())}
    assert answers3 == answers
    assert len({a for (u, q), a in answers.items() if q == questions[0] and a is not None}) >= 2  # images matter
    again = run_batch(messy, questions, out3, server=_server(llama_server, workers=3), options=AskOptions(max_tokens=8))
    assert again.records_written == 0 and again.done_before == 12


@pytest.mark.uses_network
def test_server_with_classify(messy, llama_server, siglip_fp32, tmp_path):
    """MedSigLIP runs here while the server answers; its probabilities reach every record of the unit."""
    from medgemma_cli.batch import ClassifyOptions

    out = tmp_path / "r.jsonl"
    run_batch(messy, ["Findings?", "Size?"], out, server=_server(llama_server, workers=2),
              options=AskOptions(max_tokens=4), classify=ClassifyOptions(["effusion", "normal"], siglip_fp32))
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    good = [r for r in records if r["error"] is None]
    assert len(good) == 10 and all(r["classify"]["images"] == r["images_sent"] for r in good)
    by_unit: dict[str, list] = {}
    for r in good:
        by_unit.setdefault(r["unit"], []).append(r["classify"])
    assert all(len(v) == 2 and v[0] == v[1] for v in by_unit.values())  # one scoring per unit, on both records


@pytest.mark.uses_network
def test_server_refusal_becomes_error_records(tmp_path, llama_server):
    """A request the server refuses (here: longer than its context) is an error record; the rest go on."""
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.fromarray(picture(20, 20, 40 * i)).save(root / f"i{i}.png")
    out = tmp_path / "r.jsonl"
    too_long = "Describe " * 2500 + "?"
    s = run_batch(root, ["Findings?", too_long], out, server=_server(llama_server, workers=2),
                  options=AskOptions(max_tokens=4))
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(records) == 6 and s.failed == 3
    errors = [r for r in records if r["error"]]
    assert len(errors) == 3 and all(r["question"] == too_long for r in errors)
    assert all("500" in r["error"] and "n_ctx" in r["error"] for r in errors), errors[0]["error"]


@pytest.mark.uses_network
def test_server_cli_sends_no_phi(tmp_path, llama_server):
    """Through the CLI with 2 workers and a report: the server never sees patient names, IDs or dates (its
    verbose log prints every prompt), even when the records keep them on request."""
    root = tmp_path / "phi"
    root.mkdir()
    _ct_series(root, 3, "1.2.826.0.1.3680043.99.8", phi=True)
    env = {**os.environ, "MEDGEMMA_HOME": str(tmp_path / "home")}
    out = tmp_path / "r.jsonl"
    before = llama_server["log"].stat().st_size
    cmd = [sys.executable, "-m", "medgemma_cli", "batch", str(root), "-q", "Findings?", "-q", "Size?",
           "--out", str(out), "--server", llama_server["url"], "--workers", "2", "--image-size", "32",
           "--max-tokens", "4", "--include-phi", "--with-metadata",
           "--report", str(tmp_path / "review.html"), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Roe^Richard" in out.read_text()  # kept in the records, as asked
    with open(llama_server["log"], "rb") as f:
        f.seek(before)
        seen = f.read().decode("utf-8", "replace")
    assert "Findings?" in seen and "Size?" in seen  # the log does show the prompts
    assert "Roe" not in seen and "424242" not in seen and "20240102" not in seen
    assert (tmp_path / "review.html").is_file()


@pytest.mark.uses_network
def test_server_unreachable_is_one_line(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a.png")
    out = tmp_path / "r.jsonl"
    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "batch", str(root), "-q", "x", "--out", str(out),
                        "--server", f"http://127.0.0.1:{_free_port()}"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MEDGEMMA_HOME": str(tmp_path / "home")})
    assert r.returncode == 1 and "cannot reach" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "batch", str(root), "-q", "x", "--out", str(out),
                        "--workers", "2"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MEDGEMMA_HOME": str(tmp_path / "home")})
    assert r.returncode != 0 and "--server" in r.stderr and not out.exists()


def _working_chromium() -> str | None:
    """A headless Chromium that really starts (a snap wrapper inside a container does not)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            try:
                r = subprocess.run([path, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", "about:blank"],
                                   capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if r.returncode == 0 and "<html" in r.stdout:
                return path
    return None


CHROMIUM = _working_chromium()


@pytest.mark.skipif(CHROMIUM is None, reason="no working Chromium on this machine; test_html_report checks the "
                                             "page's structure and images without a browser")
def test_report_renders_in_chromium(convert_tiny, tmp_path):
    """Debian's headless Chromium opens the report offline and paints each unit's thumbnail: a red and a blue
    scan must show up as red and blue squares of the thumbnail's size in the screenshot."""
    root = tmp_path / "colours"
    root.mkdir()
    Image.fromarray(np.tile(np.array([220, 20, 20], np.uint8), (48, 48, 1))).save(root / "red.png")
    Image.fromarray(np.tile(np.array([20, 20, 220], np.uint8), (48, 48, 1))).save(root / "blue.png")
    out = tmp_path / "r.jsonl"
    run_batch(root, ["Findings?"], out, model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=3))
    from medgemma_cli.report import write_report

    report = write_report(out, tmp_path / "review.html")
    shot = tmp_path / "shot.png"
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1200",
                        f"--screenshot={shot}", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (px[..., 0] > 180) & (px[..., 1] < 70) & (px[..., 2] < 70)
    blue = (px[..., 2] > 180) & (px[..., 0] < 70) & (px[..., 1] < 70)
    assert red.sum() >= 0.9 * 160 * 160 and blue.sum() >= 0.9 * 160 * 160, (red.sum(), blue.sum())
    rows = np.flatnonzero(red.any(axis=1))
    assert 150 <= rows[-1] - rows[0] + 1 <= 170  # one thumbnail tall, as laid out


def test_two_runs_on_one_results_file_refuse(tmp_path, convert_tiny):
    """The second run names the first one's PID and writes nothing; after the first ends, it runs."""
    from medgemma_cli.batch import RecordFile
    from medgemma_cli.errors import InputError

    root = tmp_path / "scans"
    root.mkdir()
    Image.fromarray(picture(16, 16, 50)).save(root / "a.png")
    out = tmp_path / "r.jsonl"
    holder = RecordFile(out, "jsonl")  # as a running batch holds it
    try:
        env = {**os.environ, "MEDGEMMA_HOME": str(tmp_path / "home")}
        cmd = [sys.executable, "-m", "medgemma_cli", "batch", str(root), "-q", "A?", "--out", str(out),
               "--model", str(convert_tiny("Q8_0")), "--max-tokens", "4", "--quiet"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 1
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"PID {os.getpid()}" in lines[0] and str(out) in lines[0]
        assert out.read_text() == ""
        with pytest.raises(InputError, match="another medgemma batch"):
            RecordFile(out, "jsonl")
    finally:
        holder.close()
    result = run_batch(root, ["A?"], out, model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=4))
    assert result.records_written == 1


def test_our_outputs_inside_the_folder_are_not_inputs(tmp_path, convert_tiny):
    """Results, thumbnails, key and lock written inside the scanned folder: re-runs find the same 2 units."""
    from medgemma_cli.report import write_report

    root = tmp_path / "scans"
    root.mkdir()
    for i in range(2):
        Image.fromarray(picture(16, 16, 40 * i)).save(root / f"p{i}.png")
    out = root / "results.jsonl"
    for _ in range(3):
        s = run_batch(root, ["A?"], out, model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=4))
        write_report(out, root / "review.html")
        assert s.units == 2
    assert len(out.read_text().splitlines()) == 2
    assert (root / "results.jsonl.thumbs").is_dir() and any((root / "results.jsonl.thumbs").iterdir())
    assert not any("thumbs" in path or "unit-key" in path or ".lock" in path for path, _ in s.skipped)


def test_a_lost_unit_key_is_said_not_replaced(tmp_path, convert_tiny):
    """Without its key the records' ids cannot be matched: replacing it would redo and duplicate everything."""
    from medgemma_cli.errors import InputError

    root = tmp_path / "scans"
    root.mkdir()
    Image.fromarray(picture(16, 16, 50)).save(root / "a.png")
    out = tmp_path / "r.csv"
    run_batch(root, ["A?"], out, fmt="csv", model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=3))
    key = out.with_name("r.csv.unit-key")
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    saved = key.read_bytes()
    key.unlink()
    with pytest.raises(InputError, match=re.escape("unit-key: missing, but r.csv already holds records")):
        run_batch(root, ["A?"], out, fmt="csv", model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=3))
    key.write_text("not a key")
    with pytest.raises(InputError, match="not a unit-id key"):
        run_batch(root, ["A?"], out, fmt="csv", model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=3))
    key.write_bytes(saved)
    again = run_batch(root, ["A?"], out, fmt="csv", model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=3))
    assert again.records_written == 0 and again.done_before == 1


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_names_that_are_not_utf8_or_hold_markup_never_end_the_batch(tmp_path, convert_tiny, fmt):
    root = tmp_path / "names"
    (root / "a[").mkdir(parents=True)
    Image.fromarray(picture(16, 16, 40)).save(Path(os.fsdecode(bytes(root) + b"/caf\xe9.png")))
    shutil.copy(data("CT_small.dcm"), root / "a[" / "]x\x1b[31m.dcm")
    out = tmp_path / f"r.{fmt}"
    s = run_batch(root, ["Q?"], out, fmt=fmt, model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=2))
    assert s.units == 2 and s.records_written == 2 and s.failed == 0
    text = out.read_text(encoding="utf-8")
    assert "caf\\xe9.png" in text.replace("\\\\", "\\") and "\x1b" not in text
