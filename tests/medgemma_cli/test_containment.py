"""A native crash is one clear line (ask, chat, bench…) or one unit's error records (batch), never a bare
"Segmentation fault"; `medgemma doctor` says what was decided. Crashes are real SIGSEGVs, made on purpose
where MEDGEMMA_TEST_CRASH says, so these tests mean the same on every CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medgemma_cli import containment
from pictures import picture

pytestmark = pytest.mark.slow

CT = Path(get_testdata_file("CT_small.dcm", download=False))



def medgemma(*args: str, home: Path, crash: str = "", timeout: int = 300,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDGEMMA_HOME": str(home), "COLUMNS": "200", **(extra_env or {})}
    env.pop(containment.TEST_CRASH_ENV, None)
    if crash:
        env[containment.TEST_CRASH_ENV] = crash
    return subprocess.run([sys.executable, "-m", "medgemma_cli", *args], capture_output=True, text=True, env=env,
                          cwd=home, timeout=timeout, stdin=subprocess.DEVNULL)


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def model(convert_tiny) -> Path:
    return convert_tiny("Q8_0")


@pytest.mark.parametrize("point, expected", [
    ("stage:reading the prompt", "llama.cpp crashed (SIGSEGV) while reading the prompt"),
    ("stage:writing the answer", "llama.cpp crashed (SIGSEGV) while writing the answer"),
    ("stage:encoding image 1", "ONNX Runtime crashed (SIGSEGV) while encoding image 1"),
    ("stage:loading the model", "llama.cpp crashed (SIGSEGV) while loading the model"),
])
def test_ask_crash_is_one_line(model, tmp_path, point, expected):
    r = medgemma("ask", "Describe.", str(CT), "--model", str(model), "--max-tokens", "4", "--vision-backend", "onnx",
                 home=tmp_path, crash=point)
    assert r.returncode == 1
    errors = _lines(r.stderr)
    assert errors == [f"error: {expected}; `medgemma doctor` shows why"], r.stderr
    assert "Segmentation fault" not in r.stderr + r.stdout and "Traceback" not in r.stderr


def test_ask_without_a_crash_is_untouched(model, tmp_path):
    r = medgemma("ask", "Describe.", str(CT), "--model", str(model), "--max-tokens", "4", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["images_sent"] == 1
    bad = medgemma("ask", "Describe.", str(tmp_path / "missing.png"), "--model", str(model), home=tmp_path)
    assert bad.returncode == 1 and len(_lines(bad.stderr)) == 1 and "missing.png" in bad.stderr


def test_chat_and_bench_crashes_are_one_line(model, tmp_path):
    r = medgemma("chat", str(CT), "--model", str(model), "--max-tokens", "4", home=tmp_path,
                 crash="stage:loading the model")
    assert r.returncode == 1 and _lines(r.stderr)[-1].startswith("error: llama.cpp crashed (SIGSEGV) while loading")
    r = medgemma("bench", "--shape", "tiny", "--threads", "1", home=tmp_path,
                 crash="stage:reading the benchmark prompt")
    assert r.returncode == 1
    assert _lines(r.stderr)[-1] == ("error: llama.cpp crashed (SIGSEGV) while reading the benchmark prompt; "
                                    "`medgemma doctor` shows why")


def test_killing_the_command_stops_its_work(model, tmp_path):
    """SIGKILL reaches the process doing the work too (no orphan left appending to the same results)."""
    folder = tmp_path / "units"
    folder.mkdir()
    for i in range(30):
        Image.fromarray(picture(16, 16, i * 8)).save(folder / f"p{i:02d}.png")
    out = tmp_path / "orphan-check.jsonl"
    env = {**os.environ, "MEDGEMMA_HOME": str(tmp_path)}
    p = subprocess.Popen([sys.executable, "-m", "medgemma_cli", "batch", str(folder), "-q", "A?", "--out", str(out),
                          "--model", str(model), "--max-tokens", "300", "--quiet"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.1)
    p.kill()
    p.wait()
    time.sleep(1.0)
    size = out.stat().st_size
    time.sleep(2.0)
    assert out.stat().st_size == size  # nobody is still writing
    mine = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if str(out) in (d / "cmdline").read_bytes().decode(errors="replace"):
                    mine.append(d.name)
            except OSError:
                continue
    assert not mine


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "scans"
    root.mkdir()
    for i in range(6):
        Image.fromarray(picture(16, 16, 30 * i)).save(root / f"img{i}.png")
    return root


def test_batch_crash_is_that_units_error_and_the_run_goes_on(model, folder, tmp_path):
    out = tmp_path / "r.jsonl"
    args = ("batch", str(folder), "-q", "A?", "-q", "B?", "--out", str(out), "--model", str(model),
            "--max-tokens", "4", "--quiet")
    r = medgemma(*args, home=tmp_path, crash="unit:img3.png")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and "Segmentation fault" not in r.stderr
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(records) == 12  # every (unit, question) exactly once
    crashed = [x for x in records if x["files"] == ["img3.png"]]
    assert len(crashed) == 2 and all(x["answer"] is None for x in crashed)
    for x in crashed:
        assert "llama.cpp crashed (SIGSEGV) while reading the prompt" in x["error"]
        assert "tried 2 times" in x["error"]
    others = [x for x in records if x["files"] != ["img3.png"]]
    assert len(others) == 10 and all(x["error"] is None and isinstance(x["answer"], str) for x in others)

    # resuming does not go back to the unit that crashed twice: nothing to do, nothing crashes; the exit code
    # still says the results hold a failure
    again = medgemma(*args, home=tmp_path, crash="unit:img3.png")
    assert again.returncode == 1 and "holds 2 error record(s)" in again.stderr, again.stderr
    assert len(out.read_text().splitlines()) == 12

    # once fixed (here: no crash), --retry-failed answers it
    fixed = medgemma(*args, "--retry-failed", home=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(records) == 12 and all(x["error"] is None for x in records)


def test_batch_worker_answers_like_the_model_in_process(model, folder, tmp_path):
    """The worker changes where the model runs, not what it answers."""
    from medgemma_cli.answering import AskOptions, ask_many
    from medgemma_cli.batch import run_batch

    out = tmp_path / "r.jsonl"
    s = run_batch(folder, ["A?", "B?"], out, model=model, options=AskOptions(max_tokens=6))
    assert s.failed == 0 and s.worker_seconds > 0
    records = {(Path(x["files"][0]).name, x["question"]): x["answer"]
               for x in map(json.loads, out.read_text().splitlines())}
    for name in ("img0.png", "img4.png"):
        direct = ask_many(["A?", "B?"], [folder / name], model=model, options=AskOptions(max_tokens=6))
        assert [records[(name, "A?")], records[(name, "B?")]] == [r.answer for r in direct]


def test_doctor_runs_the_probe_once_and_reports_it(tmp_path):
    verdicts = str(tmp_path / "verdicts.json")
    env = {"MEDGEMMA_VERDICT_FILE": verdicts}
    r = medgemma("doctor", "--json", home=tmp_path, crash="probe", extra_env=env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["extra_buffers"]["enabled"] is False and d["extra_buffers"]["source"] == "probe"
    assert "SIGSEGV" in d["extra_buffers"]["reason"]
    assert d["llama_cpp"]["version"] == "0.3.36" and d["cpu"]["physical_cores"] >= 1
    assert d["store"]["home"] == str(tmp_path) and d["onnxruntime"]["version"]
    again = json.loads(medgemma("doctor", "--json", home=tmp_path, extra_env=env).stdout)
    assert again["extra_buffers"]["source"] == "cache" and again["extra_buffers"]["enabled"] is False
    fresh = json.loads(medgemma("doctor", "--json", "--reprobe", home=tmp_path, extra_env=env).stdout)
    assert fresh["extra_buffers"]["source"] == "probe" and fresh["extra_buffers"]["probe_seconds"] is not None
    table = medgemma("doctor", home=tmp_path, extra_env=env)
    assert table.returncode == 0 and "extra buffer types" in table.stdout and "llama-cpp-python 0.3.36" in table.stdout


def test_describe_death():
    line = containment.describe_death(signal.SIGSEGV, ("llama.cpp", "reading the prompt"))
    assert line == "llama.cpp crashed (SIGSEGV) while reading the prompt; `medgemma doctor` shows why"
    assert containment.describe_death(signal.SIGABRT, None).startswith("medgemma crashed (SIGABRT);")
    assert "out of memory" in containment.describe_death(signal.SIGKILL, ("llama.cpp", "loading the model"))


def test_batch_worker_protocol_does_not_deadlock_on_full_pipes(model, tmp_path):
    """The next unit (pixels, more than a pipe holds) is queued while the current one's answers come back (more
    than a pipe holds): neither process may wait for the other to read. Pipes shrunk to one page make it show."""
    import pydicom

    root = tmp_path / "scans"
    (root / "ct").mkdir(parents=True)
    Image.fromarray(picture(16, 16, 70)).save(root / "a.png")
    base = pydicom.dcmread(CT)
    for i in range(6):
        base.SOPInstanceUID = f"1.2.826.0.1.3680043.55.{i}"
        base.ImagePositionPatient = [0.0, 0.0, 2.0 * i]
        base.save_as(root / "ct" / f"s{i}.dcm")
    questions = tmp_path / "q.txt"
    questions.write_text("".join(f"Question {i}: " + "is there anything at all to report here? " * 5 + "\n"
                                 for i in range(30)))
    out = tmp_path / "r.jsonl"
    r = medgemma("batch", str(root), "--questions", str(questions), "--out", str(out), "--model", str(model),
                 "--max-tokens", "2", "--quiet", home=tmp_path, timeout=240,
                 extra_env={"MEDGEMMA_TEST_PIPE_SIZE": "4096"})
    assert r.returncode == 0, r.stderr
    assert len(out.read_text().splitlines()) == 2 * 30


def test_batch_stops_when_every_unit_crashes(model, folder, tmp_path):
    """Three units in a row crashing twice each: the fault is not in the units; stop with one line."""
    out = tmp_path / "r.jsonl"
    r = medgemma("batch", str(folder), "-q", "A?", "--out", str(out), "--model", str(model), "--max-tokens", "4",
                 "--quiet", home=tmp_path, crash="unit:img")
    assert r.returncode == 1
    lines = _lines(r.stderr)
    assert "on 3 units in a row: stopped" in lines[-1] and "Traceback" not in r.stderr
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(records) == 3 and all("crashed (SIGSEGV)" in x["error"] for x in records)
