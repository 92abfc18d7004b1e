"""`medgemma batch`: walking a messy folder, units, records, resume after SIGKILL, no PHI, the HTML report,
MedSigLIP labels, and `--server` against llama-cpp-python's real server."""

from __future__ import annotations

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

from folders import ct_series, data
from medgemma_cli.answering import AskOptions
from medgemma_cli.batch import run_batch
from medgemma_cli.batch.units import pseudonym, unit_id_key
from pictures import picture

pytestmark = pytest.mark.slow


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
        ct_series(root / f"s{k}", n, f"1.2.826.0.1.3680043.99.5{k}")
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
    ct_series(root, 3, "1.2.826.0.1.3680043.99.7", phi=True)
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


def test_classify_adds_probabilities(messy, convert_tiny, siglip_fp32, tmp_path):
    """Each record carries the mean and max over the slices the model saw, equal to `classify` on those files
    (MedSigLIP's own recipe on the full rendering, not the model's resized square)."""
    from medgemma_cli.batch import ClassifyOptions
    from medgemma_cli.batch.report import write_report
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


def test_two_runs_on_one_results_file_refuse(tmp_path, convert_tiny):
    """The second run names the first one's PID and writes nothing; after the first ends, it runs."""
    from medgemma_cli.batch.records import RecordFile
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
    from medgemma_cli.batch.report import write_report

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


def test_schema_records_carry_the_parsed_answer(tmp_path, convert_tiny):
    """--schema: every record's answer is JSON valid under the schema, parsed into the record; another schema is
    another answer (not reused on resume)."""
    jsonschema = pytest.importorskip("jsonschema")
    root = tmp_path / "scans"
    root.mkdir()
    for i, level in enumerate((40, 90, 150)):
        Image.fromarray(picture(20 + i, 30, level)).save(root / f"p{i}.png")
    schema = {"type": "object", "additionalProperties": False, "required": ["effusion", "side"],
              "properties": {"effusion": {"type": "boolean"}, "side": {"enum": ["left", "right", "both", "none"]}}}
    out = tmp_path / "r.jsonl"
    s = run_batch(root, ["Effusion?"], out, model=convert_tiny("Q8_0"),
                  options=AskOptions(max_tokens=60, schema=schema))
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert s.failed == 0 and len(records) == 3
    for r in records:
        jsonschema.validate(r["parsed"], schema)
        assert json.loads(r["answer"]) == r["parsed"]
    other = {**schema, "required": ["effusion"]}
    again = run_batch(root, ["Effusion?"], out, model=convert_tiny("Q8_0"),
                      options=AskOptions(max_tokens=60, schema=other))
    assert again.records_written == 3 and again.done_before == 0
def test_a_local_batch_sizes_its_context_for_its_largest_unit(convert_tiny):
    """Not a fixed 8K cut: a volume gets the recipe's slices when the model's context allows, one image gets a
    small context, --max-slices bounds it, and the model's trained context caps it."""
    from medgemma_cli.batch.run import context_for
    from medgemma_cli.batch.units import Unit

    text = convert_tiny("Q8_0") / "text.gguf"  # trained for 4,096 tokens
    opts = AskOptions(max_tokens=256)

    def unit(n: int, error: str | None = None) -> Unit:
        return Unit("u", "series", [], images=n, error=error)

    assert context_for([unit(1)], opts, 4, text) == 2048
    assert context_for([unit(1), unit(85)], opts, 4, text) == 2048  # 85 × 12 + 256 + 512 = 1788 tokens
    assert context_for([unit(200)], opts, 4, text) == 2048  # at most --max-slices (85) of its slices
    assert context_for([unit(200)], AskOptions(max_tokens=256, max_slices=200), 4, text) == 3328
    assert context_for([unit(85)], opts, 256, text) == 4096  # 85 × 264 tokens: capped by the model
    assert context_for([unit(1), unit(300, error="unreadable")], opts, 256, text) == 2048


def test_one_question_per_unit_keeps_only_the_window_and_answers_as_ask(tmp_path, convert_tiny):
    """With one question no prefix is reused, so the sliding-window layers keep only their window (the estimate
    says the smaller cache) and the answer is `ask`'s; several questions keep the full-size cache."""
    from medgemma_cli.answering import ask

    model = convert_tiny("Q8_0")
    root = tmp_path / "series"
    root.mkdir()
    ct_series(root, 3, "1.2.826.0.1.3680043.99.61")
    seen: list = []
    run_batch(root, ["Findings?"], tmp_path / "one.jsonl", model=model,
              options=AskOptions(max_tokens=8, on_estimate=seen.append))
    run_batch(root, ["Findings?", "Heart size?"], tmp_path / "two.jsonl", model=model,
              options=AskOptions(max_tokens=8, on_estimate=seen.append))
    one, two = seen
    assert one.kv_cache < two.kv_cache
    (record,) = [json.loads(ln) for ln in (tmp_path / "one.jsonl").read_text().splitlines()]
    both = {r["question"]: r for r in map(json.loads, (tmp_path / "two.jsonl").read_text().splitlines())}
    asked = ask("Findings?", [root], model=model, options=AskOptions(max_tokens=8))
    assert record["error"] is None and record["answer"] == asked.answer == both["Findings?"]["answer"]
