"""Seeded mutants of every input kind, and every DICOM file pydicom and pydicom-data ship, read as `ask` and
`batch` read them, each in a forked child with 1 GB of address space and a deadline (see tests/fuzzing.py):
no exception but `InputError`, no signal, no hang, no error without the file's name, no blank image sent, and
no answer with zero images when images were given."""

from __future__ import annotations

import pytest

from medgemma_cli.testing import fuzz as fuzzing

pytestmark = pytest.mark.slow

MUTANTS_PER_KIND = 40  # × 13 kinds, ~1 min on 2 cores; benchmarks/fuzz_inputs.py runs thousands


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    with fuzzing.Fuzzer(tmp_path_factory.mktemp("fuzz")) as f:
        yield f


def _report(failures: list[tuple[str, list[str], str]]) -> str:
    return "\n".join(f"{what}: {', '.join(faults)} ({folder})" for what, faults, folder in failures[:20])


@pytest.mark.parametrize("kind", fuzzing.KINDS)
def test_mutants_fail_cleanly(fuzzer, kind):
    failures = []
    for case in fuzzing.cases(kind, MUTANTS_PER_KIND, seed=7):
        r = fuzzer.run(case)
        if r["faults"]:
            failures.append((f"{kind} #{case.seed}", r["faults"], r["folder"]))
    assert not failures, _report(failures)


def test_every_file_pydicom_ships_reads_or_fails_cleanly(fuzzer):
    files = fuzzing.shipped_dicom_files()
    assert len(files) > 150
    failures = []
    for path in files:
        r = fuzzing.read_file_case(path, fuzzer)
        if r["faults"]:
            failures.append((path.name, r["faults"], r["folder"]))
    assert not failures, _report(failures)


def test_the_fuzzer_sees_what_it_looks_for(fuzzer, tmp_path):
    """The harness itself: a reader that crashes, hangs or sends nothing must be reported, not passed."""
    assert fuzzing.verdict({"died": "signal SIGSEGV"}) == ["signal SIGSEGV"]
    ok = {"status": "ok", "images": 1, "flat": 0, "notes": 0}
    base = {"image_files": 1, "ask": ok, "batch-series": {"status": "ok"}, "batch-file": {"status": "ok"},
            "units": [ok]}
    assert fuzzing.verdict(base) == []
    assert fuzzing.verdict({**base, "ask": {**ok, "images": 0}}) == ["image files given, none sent, no error"]
    assert fuzzing.verdict({**base, "units": [{**ok, "flat": 1}]}) == ["a blank (flat) image sent"]
    crash = {"status": "crash", "signature": "ValueError in dicom.py:_position", "message": ""}
    assert fuzzing.verdict({**base, "batch-series": crash}) == ["batch-series: ValueError in dicom.py:_position"]
    nameless = {"status": "refused", "names_file": False, "message": "bad"}
    assert fuzzing.verdict({**base, "ask": nameless})[0].startswith("ask: error without the file's name")
