"""A conversation survives its failures: a transcript that cannot be saved, a question that cannot fit, leave the
session, its images and its earlier turns as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

pytestmark = pytest.mark.slow

CT = Path(get_testdata_file("CT_small.dcm", download=False))


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
