"""The user turn MedGemma gets (model-free): notes first, then each image with its slice label, then only the
safe metadata when asked, then the question; notes cut visibly, in order, to a character budget."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medgemma_cli.inputs.collect import Collected, PromptImage
from medgemma_cli.prompt import build_messages, truncate_notes


def _inputs() -> Collected:
    rgb = np.zeros((4, 4, 3), np.uint8)
    return Collected(images=[PromptImage(rgb, "SLICE 1", Path("a")), PromptImage(rgb, "SLICE 2", Path("b"))],
                     notes=[("hx.txt", "Smoker.")], metadata=[{"Modality": "CT", "BodyPartExamined": "CHEST"}])


def test_the_turn_is_notes_images_with_labels_then_the_question():
    messages = build_messages("Any nodule?", _inputs(), system="Be brief.")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"] == [{"type": "text", "text": "Be brief."}]
    assert messages[1]["content"] == [
        {"type": "text", "text": "Clinical note (hx.txt):\nSmoker."},
        {"type": "image"}, {"type": "text", "text": "SLICE 1"},
        {"type": "image"}, {"type": "text", "text": "SLICE 2"},
        {"type": "text", "text": "Any nodule?"},
    ]


def test_metadata_only_when_asked_and_just_before_the_question():
    plain = build_messages("Q?", _inputs())[0]["content"]
    assert not any("Modality" in part.get("text", "") for part in plain)
    asked = build_messages("Q?", _inputs(), with_metadata=True)[0]["content"]
    assert asked[-2] == {"type": "text", "text": "Image metadata: Modality: CT; BodyPartExamined: CHEST"}
    assert asked[-1] == {"type": "text", "text": "Q?"}


def test_notes_are_cut_in_order_and_say_how_much():
    notes = [("a.txt", "x" * 10), ("b.txt", "y" * 10), ("c.txt", "z" * 10)]
    kept, cut = truncate_notes(notes, 15)
    assert cut == 15
    assert kept[0] == ("a.txt", "x" * 10)
    assert kept[1][1].startswith("y" * 5 + "\n") and "5 characters left out" in kept[1][1]
    assert kept[2][1].startswith("\n") and "10 characters left out" in kept[2][1]
    assert truncate_notes(notes, 30) == (notes, 0)
