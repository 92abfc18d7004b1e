"""The results file: torn records cut whole on resume (model-free)."""

from __future__ import annotations


def test_csv_torn_row_with_newlines_is_cut_whole(tmp_path):
    """A CSV answer may hold newlines and quotes; a row cut anywhere inside is removed whole on reopening."""
    from medgemma_cli.batch.records import RecordFile

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


def _records(fmt: str, tmp_path):
    from medgemma_cli.batch.records import RecordFile

    path = tmp_path / f"r.{fmt}"
    rec = {"unit": "u1", "unit_kind": "file", "files": ["a.png"], "modality": "", "images_sent": 1,
           "question": "Q?", "answer": "one", "error": None, "model": "m", "run_key": "k"}
    f = RecordFile(path, fmt)
    f.append(rec)
    f.append({**rec, "unit": "u2", "answer": None, "error": "a.png: not an image"})  # final: the input is bad
    f.append({**rec, "unit": "u3", "answer": None, "error": "cannot reach http://h: Connection refused",
              "retryable": True})
    f.close()
    return path


def test_retryable_errors_are_not_done(tmp_path):
    """A request the server failed (refused, 5xx, timeout) is tried again by a plain re-run; its old record goes,
    so the retried answer is the only record of that (unit, question). A bad input stays final."""
    from medgemma_cli.batch.records import RecordFile

    for fmt in ("jsonl", "csv"):
        path = _records(fmt, tmp_path)
        again = RecordFile(path, fmt)
        again.close()
        assert again.done == {("u1", "k"), ("u2", "k")}, fmt
        assert again.retrying == 1 and again.dropped_errors == 0 and again.errors == 1, fmt
        text = path.read_text()
        assert "u3" not in text and "not an image" in text, fmt
        third = RecordFile(path, fmt)  # nothing left to drop: the file is not rewritten again
        third.close()
        assert third.retrying == 0 and third.done == again.done and path.read_text() == text
        path.unlink()

        path = _records(fmt, tmp_path)
        both = RecordFile(path, fmt, retry_failed=True)
        both.close()
        assert both.done == {("u1", "k")} and both.retrying == 1 and both.dropped_errors == 1, fmt
        path.unlink()


def test_csv_without_the_retryable_column_is_resumed(tmp_path):
    """Results written before the retryable column existed resume, and gain the column."""
    from medgemma_cli.batch.records import CSV_FIELDS, OLD_CSV_FIELDS, RecordFile

    path = _records("csv", tmp_path)
    lines = path.read_text().splitlines()
    old = [",".join(OLD_CSV_FIELDS)] + [ln.rsplit(",", 1)[0] for ln in lines[1:3]]
    path.write_text("\n".join(old) + "\n")
    f = RecordFile(path, "csv")
    f.close()
    assert f.done == {("u1", "k"), ("u2", "k")}
    assert path.read_text().splitlines()[0] == ",".join(CSV_FIELDS)
