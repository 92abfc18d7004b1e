"""`medgemma extract labs`: the recipe's schema, reading and merging the pages' answers, CSV/JSON written whole,
inputs that are not documents refused before the model loads; and end to end on the tiny random model (which
writes nonsense: the structure is tested, not the content)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medgemma_cli import recipes
from medgemma_cli.answering import AskOptions
from medgemma_cli.errors import InputError, OutputError
from medgemma_cli.labs import (
    CSV_COLUMNS,
    FIELDS,
    LabReport,
    PageResult,
    check_rows,
    csv_text,
    extract_labs,
    lab_schema,
    merge,
    page_images,
    plan_documents,
    read_rows,
    write_report,
)
from medgemma_cli.llama.grammar import max_chars, schema_rules
from medgemma_cli.testing.documents import encapsulated_pdf_dicom, lab_report_pdf
from pictures import picture

ROW = {"name": "Haemoglobin", "result": "13.2", "unit": "g/dL", "range": "12.0-15.5", "panel": "Complete blood count",
       "method": None, "specimen": "serum", "sample_collection_time": "03-02-2026 08:15:00"}


@pytest.fixture
def pdf(tmp_path) -> Path:
    path = tmp_path / "labs.pdf"
    path.write_bytes(lab_report_pdf())
    return path


@pytest.mark.parametrize("rows, valid", [
    ([], True),  # a page without lab tests (a cover letter)
    ([ROW], True),
    ([{**ROW, "unit": None, "range": None, "panel": None, "specimen": None, "sample_collection_time": None}], True),
    ([{**ROW, "name": None}], False),  # a row without a name or a result is not a test
    ([{**ROW, "result": None}], False),
    ([{**ROW, "name": ""}], False),
    ([{**ROW, "result": 13.2}], False),  # every value is a string ("<0.5", "Positive")
    ([{k: v for k, v in ROW.items() if k != "specimen"}], False),  # all eight keys, always
    ([{**ROW, "flag": "H"}], False),  # and no others
    ([{**ROW, "unit": "x" * 31}], False),  # over the field's cap
    ({"tests": [ROW]}, False),
    ([ROW] * 101, False),
])
def test_the_schema_is_the_recipes_eight_fields(rows, valid):
    schema = lab_schema()
    assert list(schema["items"]["properties"]) == list(FIELDS) == schema["items"]["required"]
    assert schema["items"]["additionalProperties"] is False
    jsonschema.Draft202012Validator.check_schema(schema)
    assert jsonschema.Draft202012Validator(schema).is_valid(rows) is valid
    assert (check_rows(rows, schema) is None) is valid  # our own check agrees with jsonschema


def test_a_value_is_counted_in_characters_as_jsonschema_counts_them():
    schema = lab_schema()
    assert check_rows([{**ROW, "unit": "µ" * 30}], schema) is None  # characters, not bytes
    assert check_rows([{**ROW, "unit": "x" * 30 + "\ufffd"}], schema) == "test 1: unit has 31 characters"
    assert not jsonschema.Draft202012Validator(schema).is_valid([{**ROW, "unit": "x" * 30 + "\ufffd"}])


def test_the_grammar_keeps_the_caps_and_nullability():
    rules = schema_rules(lab_schema(max_rows=2, max_chars=3))
    assert "answer-item-method ::= answer-item-method-0 | null" in rules  # null allowed, length cap kept
    assert "null" not in next(r for r in rules.splitlines() if r.startswith("answer-item-name ::="))
    assert max_chars(lab_schema(max_rows=2, max_chars=3)) is not None  # so a budget can hold the whole answer


def test_the_recipe_text():
    text = recipes.TEMPLATES["labs"].text
    assert text.startswith("You are a Clinical Data Extraction Specialist. Your job is to parse lab reports with "
                           "high precision.")
    assert "extract all lab tests into a JSON list" in text
    assert text.endswith("Each test object in the list must include: name, result, unit, range, panel, method, "
                         "specimen, sample_collection_time (formatted as DD-MM-YYYY HH:MM:SS)")


def test_answers_are_read_fences_tolerated_nothing_repaired():
    schema = lab_schema()
    assert read_rows(json.dumps([ROW]), schema) == ([ROW], None)
    assert read_rows("```json\n" + json.dumps([ROW]) + "\n```", schema) == ([ROW], None)
    assert read_rows("Here they are:\n```\n[]\n```", schema) == ([], None)
    rows, why = read_rows(json.dumps([ROW])[:-20], schema, stopped="max_tokens")
    assert rows is None and why is not None and "stopped at max_tokens" in why and "--max-tokens" in why
    rows, why = read_rows(json.dumps([ROW])[:-20], schema, stopped="context_full")
    assert rows is None and why is not None and "--max-tokens" in why
    rows, why = read_rows('{"name": "Urea"}', schema)
    assert rows is None and why == "the answer is a JSON dict, not a list of tests"
    rows, why = read_rows(json.dumps([{**ROW, "extra": "1"}]), schema)
    assert rows is None and why == "test 1 has extra extra"


def test_no_budget_advice_when_the_grammar_ended_the_answer():
    rows, why = read_rows(json.dumps([ROW])[:-20], lab_schema(), stopped="grammar")
    assert rows is None and why is not None and "the grammar allowed nothing more" in why
    assert "--max-tokens" not in why  # more tokens would not have helped


def _page(file: str, page: int, rows: list | None) -> PageResult:
    return PageResult(file, page, rows, None if rows is not None else "the answer is not JSON", "", "eos")


def test_rows_are_merged_in_page_order_with_file_and_page():
    pages = [_page("a.pdf", 1, [ROW, {**ROW, "name": "Urea"}]), _page("a.pdf", 2, None),
             _page("a.pdf", 3, []), _page("b.png", 1, [{**ROW, "name": "Sodium"}])]
    merged = merge(pages)
    assert [(r["file"], r["page"], r["name"]) for r in merged] == [
        ("a.pdf", 1, "Haemoglobin"), ("a.pdf", 1, "Urea"), ("b.png", 1, "Sodium")]
    assert all(list(r) == list(CSV_COLUMNS) for r in merged)


def test_csv_has_the_header_and_keeps_values_whole():
    rows = merge([_page("a, b.pdf", 2, [{**ROW, "name": 'Free T4 "direct"', "method": None}])])
    text = csv_text(rows)
    assert text.splitlines()[0] == "file,page,name,result,unit,range,panel,method,specimen,sample_collection_time"
    back = list(csv.DictReader(io.StringIO(text)))
    assert back == [{**{k: str(v) for k, v in ROW.items() if v is not None}, "file": "a, b.pdf", "page": "2",
                     "name": 'Free T4 "direct"', "method": ""}]


def test_outputs_are_written_whole_or_not_at_all(tmp_path):
    report = LabReport([_page("a.pdf", 1, [ROW])], merge([_page("a.pdf", 1, [ROW])]), [], [], {}, lab_schema())
    write_report(report, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["rows"][0]["page"] == 1 and data["pages"][0]["rows"] == [ROW] and data["written"].endswith("r.json")
    with pytest.raises(InputError, match=r"r\.txt: --out writes \.json"):
        write_report(report, tmp_path / "r.txt")
    with pytest.raises(OutputError, match="writing failed"):
        write_report(report, tmp_path / "r.json" / "r.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temporary left behind
    write_report(report, tmp_path / "new" / "r.csv")  # a missing folder is made, as batch and embed make theirs
    assert (tmp_path / "new" / "r.csv").read_text().startswith("file,page,")


def test_an_out_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, pdf):
    """Else every page would be read and then lost at the end."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder.csv").mkdir()
    no_model = tmp_path / "no-model"  # reaching the model would be a different error
    for out, why in [(tmp_path / "a-file" / "r.csv", r"cannot create its folder: .*a-file is not a folder"),
                     (tmp_path / "a-file" / "sub" / "r.csv", "cannot create its folder"),
                     (tmp_path / "a-folder.csv", "is a folder")]:
        with pytest.raises(OutputError, match=why) as e:
            extract_labs([pdf], model=no_model, out=out)
        assert e.value.path == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder.csv", "labs.pdf"]  # no probe left


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a read-only folder")
def test_an_unwritable_folder_is_refused_before_the_model_loads(tmp_path, pdf):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        for out in (locked / "r.csv", locked / "sub" / "r.csv"):
            with pytest.raises(OutputError, match=r"cannot write in .*locked"):
                extract_labs([pdf], model=tmp_path / "no-model", out=out)
    finally:
        locked.chmod(0o700)


def test_documents_are_planned_and_anything_else_refused(tmp_path, pdf):
    png = tmp_path / "scan.png"
    Image.fromarray(picture(60, 40, 30)).save(png)
    dcm_pdf = encapsulated_pdf_dicom(tmp_path / "report.dcm", lab_report_pdf())
    docs = plan_documents([pdf, png, dcm_pdf], max_pages=1)
    assert [(d.kind, d.pages, d.total) for d in docs] == [("document", 1, 2), ("image", 1, 1), ("dicom-pdf", 1, 2)]
    cxr = tmp_path / "chest.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), cxr)
    note = tmp_path / "note.txt"
    note.write_text("Haemoglobin 13.2 g/dL\n")
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4\nnot really\n")
    for bad, why in [(cxr, "a DICOM CT object, not a document"), (note, "a text note, not a document"),
                     (broken, "not a readable PDF"), (tmp_path, "a folder"), (tmp_path / "gone.pdf", "no such file")]:
        with pytest.raises(InputError, match=why) as e:
            plan_documents([pdf, bad])
        assert e.value.path == bad


def test_pages_keep_their_numbers(tmp_path, pdf):
    doc = plan_documents([pdf])[0]
    pages = list(page_images(doc, 64))
    assert [n for n, _, _ in pages] == [1, 2] and not doc.notes
    assert all(rgb.shape == (64, 64, 3) and why is None for _, rgb, why in pages)
    doc = plan_documents([pdf], max_pages=1)[0]
    assert [n for n, _, _ in page_images(doc, 64)] == [1] and doc.notes == ["2 pages: the first 1 rendered"]


def _dense_second_page(tmp_path: Path, monkeypatch) -> Path:
    """A report whose second page's drawing instructions are over the (lowered) limit: it is left out."""
    from medgemma_cli.inputs import documents

    rows = [("Sodium", "140", "mmol/L", "135-145")]
    path = tmp_path / "dense.pdf"
    path.write_bytes(lab_report_pdf([("Electrolytes", rows), ("Electrolytes", rows * 30)]))
    monkeypatch.setattr(documents, "PAGE_CONTENT_BYTES", 4000)  # page 1 draws 0.7 KB, page 2 7.3 KB
    return path


def test_only_the_pages_that_render_are_counted(tmp_path, monkeypatch):
    dense = _dense_second_page(tmp_path, monkeypatch)
    dcm = encapsulated_pdf_dicom(tmp_path / "dense.dcm", dense.read_bytes())
    for doc in plan_documents([dense, dcm]):
        assert (doc.numbers, doc.pages, doc.total) == ([1], 1, 2)
        assert len(doc.notes) == 1 and doc.notes[0].startswith("page 2 not rendered: its drawing instructions")
        assert [n for n, _, _ in page_images(doc, 64)] == [1]


def test_blank_or_unreadable_scans_are_refused_before_the_model_loads(tmp_path, pdf):
    """Refused while planning: found after the model loaded, they ended the run and lost every page read."""
    blank, broken = tmp_path / "blank.png", tmp_path / "broken.png"
    Image.fromarray(np.full((40, 30, 3), 255, np.uint8)).save(blank)
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    for bad, why in [(blank, "the image is blank"), (broken, "not a readable image")]:
        with pytest.raises(InputError, match=why) as e:
            plan_documents([pdf, bad])
        assert e.value.path == bad


# --- end to end on the tiny random model ----------------------------------------------------------------------

SMALL = lab_schema(max_rows=3, max_chars=8)  # a budget of max_chars(SMALL) tokens always holds the whole answer


@pytest.mark.slow
def test_one_call_per_page_each_answer_valid_rows_merged(model, tmp_path, pdf, monkeypatch):
    from medgemma_cli.llama import engine as engine_module
    from medgemma_cli.llama.session import PrefixSession

    loads, asked = [], []
    real_init, real_ask = engine_module.Engine.__init__, PrefixSession.ask
    monkeypatch.setattr(engine_module.Engine, "__init__", lambda self, *a, **k: (loads.append(1),
                                                                                 real_init(self, *a, **k))[1])
    monkeypatch.setattr(PrefixSession, "ask", lambda self, q, *a, **k: (asked.append((len(self.inputs.images), q)),
                                                                        real_ask(self, q, *a, **k))[1])
    png = tmp_path / "scan.png"
    Image.fromarray(picture(80, 60, 30)).save(png)
    seen = []
    budget = max_chars(SMALL)
    assert budget is not None
    report = extract_labs([pdf, png], model=model, options=AskOptions(max_tokens=budget, cache=False), schema=SMALL,
                          out=tmp_path / "r.csv", on_page=lambda i, n, f, p, r: seen.append((i, n, f.name, p,
                                                                                              r is None)))
    assert len(loads) == 1  # one model for every file
    assert asked == [(1, recipes.TEMPLATES["labs"].text.strip())] * 3  # one page image, then the recipe, per call
    assert seen == [(1, 3, "labs.pdf", 1, True), (1, 3, "labs.pdf", 1, False), (2, 3, "labs.pdf", 2, True),
                    (2, 3, "labs.pdf", 2, False), (3, 3, "scan.png", 1, True), (3, 3, "scan.png", 1, False)]
    assert [(Path(p.file).name, p.page) for p in report.pages] == [("labs.pdf", 1), ("labs.pdf", 2), ("scan.png", 1)]
    for p in report.pages:
        jsonschema.validate(json.loads(p.answer), SMALL)  # every answer valid under the schema
        assert p.error is None and p.stopped == "eos" and p.rows == json.loads(p.answer)
    expected = [(p.page, Path(p.file).name) for p in report.pages for _ in p.rows or []]
    assert [(r["page"], Path(r["file"]).name) for r in report.rows] == expected
    assert report.model["images_encoded"] == 3 and not report.failed
    with open(tmp_path / "r.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == list(CSV_COLUMNS)
    assert [(int(r[1]), Path(r[0]).name) for r in table[1:]] == expected


@pytest.mark.slow
def test_sampled_answers_are_utf8_and_within_the_caps(model, pdf):
    """At temperature 1 the random model picks byte tokens (a quarter of its vocabulary) that llama.cpp's grammar
    would put together into bytes that are not UTF-8 (F5 B0 A0 A1: one character to it, four U+FFFD to Python), so
    that a capped value came out longer than its cap; seed 0 did so on both pages before the sampler kept UTF-8."""
    budget = max_chars(SMALL)
    assert budget is not None
    report = extract_labs([pdf], model=model, options=AskOptions(max_tokens=2 * budget, temperature=1.0, seed=0,
                                                                 cache=False), schema=SMALL)
    assert [p.page for p in report.pages] == [1, 2]
    for p in report.pages:
        assert "\ufffd" not in p.answer and p.stopped == "eos"
        jsonschema.validate(json.loads(p.answer), SMALL)  # strictly: characters as Python and jsonschema count
        assert p.error is None


@pytest.mark.slow
def test_a_page_that_fails_once_the_model_runs_costs_that_page_alone(model, tmp_path, monkeypatch):
    """A scan that turns blank after it was planned (a scanner still writing it) is a failed page: the other pages
    are still read and written. The totals count the pages that render (page 2 of the report is left out)."""
    dense = _dense_second_page(tmp_path, monkeypatch)
    scan, after = tmp_path / "scan.png", tmp_path / "after.png"
    Image.fromarray(picture(80, 60, 30)).save(scan)
    Image.fromarray(picture(80, 60, 31)).save(after)
    seen = []

    def blank_the_scan(i, n, f, p, result):
        seen.append((i, n, f.name, p, result is None))
        if result is not None and i == 1:
            Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(scan)

    report = extract_labs([dense, scan, after], model=model, schema=SMALL, out=tmp_path / "r.json",
                          options=AskOptions(max_tokens=max_chars(SMALL), cache=False), on_page=blank_the_scan)
    assert seen == [(1, 3, "dense.pdf", 1, True), (1, 3, "dense.pdf", 1, False), (2, 3, "scan.png", 1, True),
                    (2, 3, "scan.png", 1, False), (3, 3, "after.png", 1, True), (3, 3, "after.png", 1, False)]
    assert [(Path(p.file).name, p.page, p.stopped) for p in report.pages] == [
        ("dense.pdf", 1, "eos"), ("scan.png", 1, "not_read"), ("after.png", 1, "eos")]
    assert [Path(p.file).name for p in report.failed] == ["scan.png"]
    assert report.failed[0].error == "the image is blank: every pixel has the same value"
    assert [(f["pages_read"], f["pages"]) for f in report.files] == [(1, 2), (0, 1), (1, 1)]
    assert report.model["images_encoded"] == 2
    assert any("page 2 not rendered" in w for w in report.warnings)
    data = json.loads((tmp_path / "r.json").read_text())
    assert [p["error"] is None for p in data["pages"]] == [True, False, True]


@pytest.mark.slow
def test_nothing_is_written_when_the_run_stops_halfway(model, tmp_path, pdf):
    def stop_after_first(i, n, f, p, result):
        if result is not None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract_labs([pdf], model=model, options=AskOptions(max_tokens=max_chars(SMALL), cache=False), schema=SMALL,
                     out=tmp_path / "r.json", on_page=stop_after_first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labs.pdf"]


@pytest.mark.slow
def test_the_command(model, tmp_path, pdf):
    env = {**os.environ, "MEDGEMMA_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "extract", "labs", str(pdf), "--model", str(model),
                        "--json", "--no-cache"], capture_output=True, text=True, timeout=600, env=env)
    data = json.loads(r.stdout)
    assert [p["page"] for p in data["pages"]] == [1, 2]
    assert r.returncode == (1 if any(p["error"] for p in data["pages"]) else 0), r.stderr
    for p in data["pages"]:  # the full schema: a page's answer is valid, or said not to be
        assert p["error"] is not None or jsonschema.Draft202012Validator(data["schema"]).is_valid(p["rows"])
    assert "labs.pdf page 1 (1/2)" in r.stderr and "labs.pdf page 2 (2/2)" in r.stderr  # progress per page
    cxr = tmp_path / "chest.dcm"
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), cxr)
    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "extract", "labs", str(pdf), str(cxr), "--model",
                        str(model), "--out", str(tmp_path / "r.csv")], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {cxr}: a DICOM CT object, not a document: extract labs reads PDF files, scanned pages (PNG/JPEG) "
        "and DICOM Encapsulated PDF"]
    assert not (tmp_path / "r.csv").exists()
