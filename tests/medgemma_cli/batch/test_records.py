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
