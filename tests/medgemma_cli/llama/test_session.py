"""Images encoded once, many questions: answers from a reused state equal separate asks, `chat` encodes once and
drops old turns visibly, and a conversation survives its failures (a transcript that cannot be saved, a question
that cannot fit leave the session, its images and its earlier turns as they were)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from medgemma_cli.answering import AskOptions, ask, ask_many, open_session

pytestmark = pytest.mark.slow

CT = Path(get_testdata_file("CT_small.dcm", download=False))
EMRI = Path(get_testdata_file("emri_small.dcm", download=False))


def _chat(model: Path, files: list[Path], script: str, home: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDGEMMA_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "medgemma_cli", "chat", *map(str, files), "--model", str(model),
                           "--max-tokens", "8", *extra], input=script, capture_output=True, text=True, env=env,
                          cwd=home, timeout=300)


def test_a_failed_turn_does_not_end_the_conversation(convert_tiny, tmp_path):
    model = convert_tiny("Q8_0")
    transcript = tmp_path / "chat.json"
    too_long = "Describe every detail " * 400  # more than --ctx 512 holds, even without earlier turns
    script = (f"First question?\n/save {tmp_path}/no-such-folder/chat.json\n{too_long}\nSecond question?\n"
              f"/save {transcript}\n/quit\n")
    env = {**os.environ, "MEDGEMMA_HOME": str(tmp_path), "COLUMNS": "300"}
    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "chat", str(CT), "--model", str(model), "--max-tokens",
                        "8", "--ctx", "512"], input=script, capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no-such-folder/chat.json: cannot save" in r.stderr and "does not fit in the context" in r.stderr
    assert "Traceback" not in r.stderr
    turns = json.loads(transcript.read_text())["turns"]
    assert [t["question"] for t in turns] == ["First question?", "Second question?"]
    assert not list((tmp_path).glob(".*partial*"))


def test_reuse_gives_the_same_answers_as_separate_asks(convert_tiny, tmp_path):
    model = convert_tiny("Q8_0")
    note = tmp_path / "note.txt"
    note.write_text("Known emphysema. New shortness of breath.")
    questions = ["Describe the findings.", "Is there a pneumothorax?", "What would you recommend next?"]
    opts = AskOptions(max_tokens=10, cache=False)  # reuse within one process; the store's cache is test_caches'
    together = ask_many(questions, [EMRI, note], model=model, options=opts)
    separate = [ask(q, [EMRI, note], model=model, options=opts) for q in questions]
    assert [r.answer for r in together] == [r.answer for r in separate]
    assert [r.tokens for r in together] == [r.tokens for r in separate]
    assert together[0].timings["image_encode_s"] > 0 and together[1].timings["image_encode_s"] == 0
    session = open_session("?", [EMRI], model=model, options=opts).session
    try:
        for q in questions:
            session.ask(q, 4)
        assert session.engine.images_encoded == 10  # the ten slices, once
    finally:
        session.engine.close()


def test_chat_two_questions_one_encoding(convert_tiny, tmp_path):
    model = convert_tiny("Q8_0")
    transcript = tmp_path / "chat.json"
    r = _chat(model, [CT], f"Describe the findings.\nAnd compared with last year?\n/save {transcript}\n/quit\n",
              tmp_path)
    assert r.returncode == 0, r.stderr
    t = json.loads(transcript.read_text())
    assert t["image_encodings"] == 1 and [x["question"] for x in t["turns"]] == [
        "Describe the findings.", "And compared with last year?"]
    assert "CT_small" not in transcript.read_text() and str(tmp_path) not in transcript.read_text()  # no paths
    first = ask("Describe the findings.", [CT], model=model, options=AskOptions(max_tokens=8))
    assert t["turns"][0]["answer"] == first.answer  # the first turn is exactly an ask
    assert r.stderr.count("images encoded 1 time(s) in total") == 2 and "2 time(s)" not in r.stderr


def test_chat_drops_old_turns_visibly(convert_tiny, tmp_path):
    model = convert_tiny("Q8_0")
    script = "".join(f"Question number {i} about the findings in some detail?\n" for i in range(12)) + "/quit\n"
    r = _chat(model, [CT], script, tmp_path, "--ctx", "256")
    assert r.returncode == 0, r.stderr
    assert "older turns dropped to fit the context" in r.stderr
