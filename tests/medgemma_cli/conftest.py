"""Fixtures shared by the tests of `ask` and of the engine under it: a tiny converted MedGemma and a clinical note."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTE_TEXT = "72-year-old smoker with three days of fever and productive cough."


@pytest.fixture(scope="module")
def model(convert_tiny) -> Path:
    return convert_tiny("Q8_0")


@pytest.fixture
def note(tmp_path) -> Path:
    p = tmp_path / "note.txt"
    p.write_text(NOTE_TEXT + "\n")
    return p
