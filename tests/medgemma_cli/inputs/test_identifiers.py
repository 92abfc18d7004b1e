"""The patient's own identifiers never reach the model, the outputs, or a server, unless --include-phi.

One study carries known identifiers in every identifying header, in the text of its structured report and in
a note given beside it; then every place something is written or sent is searched for them."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medgemma_cli.inputs.collect import collect
from medgemma_cli.inputs.identifiers import date_forms, from_datasets, name_forms
from medgemma_cli.prompt import build_messages

STUDY_UID = "1.2.826.0.1.3680043.20040826185059.7"
SR_TEXT = ("Patient Jane Doe (MRN-998877, DOB 14/02/1958) seen by Dr John Smith at St Elsewhere Hospital. "
           "Accession ACC5550123. Small left pleural effusion.")
NOTE = ("DOE, JANE Q. born February 14, 1958, referred by Smith, John.\nHistory: cough for three days; "
        "no fever. Other id HX-4411.\n")
# what must not appear anywhere (word-bounded, so "Does" or "Smithfield" would not count)
IDENTIFIERS = ["Doe", "Jane", "Quinn", "MRN-998877", "HX-4411", "ACC5550123", "Smith", "John", "Elsewhere",
               "1958", "20040826185059"]


def leaks(text: str) -> list[str]:
    return [s for s in IDENTIFIERS if re.search(rf"(?<![\w-]){re.escape(s)}(?![\w-])", text, re.IGNORECASE)]


def _identify(ds: pydicom.Dataset) -> None:
    ds.PatientName = "Doe^Jane^Quinn"
    ds.PatientID = "MRN-998877"
    ds.OtherPatientIDs = "HX-4411"
    ds.PatientBirthDate = "19580214"
    ds.AccessionNumber = "ACC5550123"
    ds.ReferringPhysicianName = "Smith^John"
    ds.InstitutionName = "St Elsewhere Hospital"
    ds.StudyInstanceUID = STUDY_UID


@pytest.fixture
def study(tmp_path) -> Path:
    root = tmp_path / "study"
    root.mkdir()
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    for i in range(2):
        ds = copy.deepcopy(base)
        _identify(ds)
        ds.SeriesInstanceUID = STUDY_UID + ".1"
        ds.SOPInstanceUID = f"{STUDY_UID}.1.{i}"
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * i]
        ds.save_as(root / f"ct{i}.dcm")
    sr = pydicom.dcmread(get_testdata_file("test-SR.dcm", download=False))
    _identify(sr)
    sr.SeriesInstanceUID = STUDY_UID + ".2"
    sr.SOPInstanceUID = STUDY_UID + ".2.1"
    text_items = [item for item in sr.ContentSequence if item.get("ValueType") == "TEXT"]
    text_items[0].TextValue = SR_TEXT
    sr.save_as(root / "report.dcm")
    (root / "Doe_Jane_note.txt").write_text(NOTE)
    return root


def test_name_and_date_forms():
    forms = name_forms("Doe^Jane^Quinn")
    assert {"Doe^Jane^Quinn", "Jane Doe", "Doe, Jane", "Jane Quinn Doe", "Jane Q. Doe", "Doe, Jane Q.", "Doe", "Jane",
            "Quinn"} <= forms
    dates = date_forms("19580214")
    assert {"1958-02-14", "19580214", "14/02/1958", "02/14/1958", "2/14/1958", "14.02.1958", "February 14, 1958",
            "14 Feb 1958", "Feb 14, 1958", "14/02/58"} <= dates
    assert date_forms("garbage") == {"garbage"} and date_forms("") == set()


def test_scrub_whole_words_only(study):
    known = from_datasets([pydicom.dcmread(study / "ct0.dcm")])
    text, n = known.scrub("Jane Doe (Doerr, Doe-like) saw DR. JOHN SMITH on 2/14/1958 re MRN-998877 at "
                          "st elsewhere hospital; Johnson stays.")
    assert text == ("[NAME] (Doerr, [NAME]-like) saw DR. [NAME] on [DATE] re [ID] at [INSTITUTION]; Johnson stays.")
    assert n == 6


def test_the_prompt_carries_placeholders_not_identifiers(study):
    inputs = collect([study], 32)
    assert inputs.identifiers_removed >= 10 and len(inputs.images) == 2
    text = json.dumps(build_messages("Any effusion?", inputs, with_metadata=True))
    assert leaks(text) == []
    assert "[NAME]" in text and "[ID]" in text and "[DATE]" in text and "[INSTITUTION]" in text
    assert "Small left pleural effusion" in text and "cough for three days" in text  # the clinical content stays
    kept = collect([study], 32, scrub_identifiers=False)  # --include-phi
    assert kept.identifiers_removed == 0 and "Jane Doe" in json.dumps(build_messages("?", kept))


def _cli(*args: str, home: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDGEMMA_HOME": str(home / "store"), "HOME": str(home / "user"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "medgemma_cli", *args], input=stdin, capture_output=True, text=True,
                          env=env, cwd=home, timeout=300)


def _all_text(folder: Path) -> str:
    parts = []
    for p in folder.rglob("*"):
        if p.is_file():
            parts.append(p.name)
            parts.append(p.read_bytes().decode("latin-1"))
    return "\n".join(parts)


@pytest.mark.slow
def test_no_identifier_in_what_ask_chat_and_batch_write(study, convert_tiny, tmp_path):
    model = str(convert_tiny("Q8_0"))
    files = [str(study / "ct0.dcm"), str(study / "ct1.dcm"), str(study / "report.dcm"),
             str(study / "Doe_Jane_note.txt")]
    work = tmp_path / "work"
    work.mkdir()

    r = _cli("ask", "Any effusion?", *files, "--model", model, "--max-tokens", "6", "--json", "--with-metadata",
             "--save-input", str(work / "seen"), home=work)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["identifiers_removed"] >= 10
    # the JSON names the input files as given; only their paths may say what the user called them
    shown = json.dumps({k: v for k, v in result.items() if k != "inputs"})
    assert leaks(shown) == [] and leaks(r.stderr) == []

    r = _cli("chat", *files, "--model", model, "--max-tokens", "6", home=work,
             stdin=f"Any effusion?\n/save {work / 'talk.json'}\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert leaks(r.stdout) == [] and leaks(r.stderr) == []
    assert leaks((work / "talk.json").read_text()) == []

    out = work / "night" / "results.jsonl"
    r = _cli("batch", str(study), "-q", "Any effusion?", "--unit", "study", "--out", str(out), "--model", model,
             "--max-tokens", "6", "--report", str(work / "night" / "review.html"), "--quiet", home=work)
    assert r.returncode == 0, r.stderr
    (record,) = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert record["identifiers_removed"] >= 5 and record["images_sent"] == 2  # the SR's (batch takes no notes)
    assert (out.parent / "results.jsonl.unit-key").is_file()
    night = _all_text(out.parent)
    # file names are the user's own (and the record lists them); nothing else may carry an identifier
    assert leaks(night.replace("Doe_Jane_note.txt", "note.txt")) == []
    assert leaks((r.stdout + r.stderr).replace("Doe_Jane_note.txt", "note.txt")) == []  # "skipped <file>"
    again = _cli("batch", str(study), "-q", "Any effusion?", "--unit", "study", "--out", str(out), "--model", model,
                 "--max-tokens", "6", "--quiet", home=work)
    assert again.returncode == 0 and len(out.read_text().splitlines()) == 1  # stable ids: resumed, not redone

    for place in ("store", "user", "seen"):  # the model store, the user's home (~/.cache…), the saved inputs
        if (work / place).exists():
            assert leaks(_all_text(work / place)) == [], place

    r = _cli("batch", str(study), "-q", "Any effusion?", "--unit", "study", "--out", str(work / "phi.jsonl"),
             "--model", model, "--max-tokens", "4", "--include-phi", "--quiet", home=work)
    assert r.returncode == 0, r.stderr
    (record,) = [json.loads(ln) for ln in (work / "phi.jsonl").read_text().splitlines()]
    assert record["unit"] == STUDY_UID and record["identifiers_removed"] == 0
    assert record["phi"]["PatientName"] == "Doe^Jane^Quinn"


@pytest.mark.uses_network
def test_no_identifier_reaches_the_server(study, tmp_path):
    """batch --server: what the server receives (prompt text and images) carries no identifier."""
    from medgemma_cli.answering import AskOptions
    from medgemma_cli.batch import ServerOptions, run_batch

    bodies: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send({"data": [{"id": "medgemma-4b"}]})

        def do_POST(self):
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
            self._send({"choices": [{"message": {"role": "assistant", "content": "A small effusion."},
                                     "finish_reason": "stop"}], "usage": {"prompt_tokens": 9, "completion_tokens": 4}})

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "remote.jsonl"
        s = run_batch(study, ["Any effusion?"], out, unit="study", options=AskOptions(max_tokens=8, with_metadata=True),
                      server=ServerOptions(f"http://127.0.0.1:{httpd.server_address[1]}/v1", image_size=32))
    finally:
        httpd.shutdown()
    assert s.failed == 0 and len(bodies) == 1
    sent = json.loads(bodies[0])
    texts = [part["text"] for m in sent["messages"] for part in (m["content"] if isinstance(m["content"], list)
                                                                 else [{"type": "text", "text": m["content"]}])
             if part.get("type") == "text"]
    images = [part for m in sent["messages"] if isinstance(m["content"], list) for part in m["content"]
              if part.get("type") == "image_url"]
    assert len(images) == 2 and "[NAME]" in "\n".join(texts) and "Small left pleural effusion" in "\n".join(texts)
    assert leaks(bodies[0]) == []
    assert leaks(out.read_text()) == []
    assert np.isfinite(json.loads(out.read_text())["identifiers_removed"])


def test_clinical_words_that_are_also_names_stay():
    ds = pydicom.Dataset()
    ds.PatientName = "de la Cruz^Maria"
    ds.ReferringPhysicianName = "White^Al"
    ds.OperatorsName = "CT"
    ds.PatientID = "12"
    known = from_datasets([ds])
    text = "On CT the white matter of de la Cruz's brain shows a 12 mm nodule; Dr White and Maria Cruz agree."
    out, n = known.scrub(text)
    assert out == ("On CT the white matter of [NAME]'s brain shows a 12 mm nodule; Dr [NAME] and [NAME] [NAME] "
                   "agree."), out  # "CT", "white", "12" and the particles are text, not names or IDs
    assert n == 4
