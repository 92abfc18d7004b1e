"""`--prior`: the prior study first, then the current one (Google's longitudinal recipe), labels only if asked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgemma_cli.errors import InputError, MedgemmaError
from medgemma_cli.inputs.collect import Collected, PromptImage, combine_studies
from medgemma_cli.inputs.images import resize_square
from medgemma_cli.prompt import build_messages
from pictures import picture


def _study(level: int, name: str) -> Collected:
    return Collected(images=[PromptImage(picture(8, 8, level), None, Path(name))])


def _content(messages: list[dict]) -> list[str]:
    return [p["text"] if p["type"] == "text" else f"<{p['type']}>" for p in messages[-1]["content"]]


def test_prior_images_come_first_with_nothing_between():
    both = combine_studies(_study(10, "old.png"), _study(200, "new.png"))
    assert [str(i.source) for i in both.images] == ["old.png", "new.png"]
    assert _content(build_messages("What changed?", both)) == ["<image>", "<image>", "What changed?"]


def test_timepoint_labels_only_when_asked():
    both = combine_studies(_study(10, "old.png"), _study(200, "new.png"), label_timepoints=True)
    assert _content(build_messages("What changed?", both)) == [
        "Prior study:", "<image>", "Current study:", "<image>", "What changed?"]


def test_a_study_without_images_cannot_be_compared():
    with pytest.raises(InputError, match="images in both"):
        combine_studies(Collected(), _study(200, "new.png"))


@pytest.fixture
def two_studies(tmp_path):
    old, new = tmp_path / "old.png", tmp_path / "new.png"
    Image.fromarray(picture(20, 30, 10)).save(old)
    Image.fromarray(picture(24, 30, 200)).save(new)
    return old, new


@pytest.mark.slow
def test_prior_order_and_tokens_through_the_model(convert_tiny, two_studies, tmp_path):
    """What the model receives: the prior's pixels first, then the current's, and the labels' tokens between them
    only with --label-timepoints."""
    from medgemma_cli.answering import AskOptions, open_session

    old, new = two_studies
    model = convert_tiny("Q8_0")
    prompts = {}
    for label in (False, True):
        saved = tmp_path / f"input-{label}"
        conv = open_session("What changed?", [new], model=model,
                            options=AskOptions(prior=[old], label_timepoints=label, save_input=saved))
        try:
            engine, inputs = conv.session.engine, conv.session.inputs
            size = inputs.images[0].rgb.shape[0]
            for png, source in zip(sorted(saved.glob("*.png")), (old, new), strict=True):
                expected = resize_square(np.asarray(Image.open(source).convert("RGB")), size)
                assert (np.asarray(Image.open(png)) == expected).all()
            rendered = engine.render(build_messages("What changed?", inputs))
            tokens = engine.tokenize(rendered)
            prompts[label] = (rendered, tokens, engine.tokenize("Prior study:"), engine.tokenize("Current study:"))
        finally:
            conv.close()
    plain, plain_tokens, prior_ids, current_ids = prompts[False]
    assert "study" not in plain
    image = "<start_of_image>"
    assert plain.index(image) < plain.rindex(image) < plain.index("What changed?")
    assert plain[plain.index(image) + len(image):plain.rindex(image)] == ""  # the chat template trims, joins
    labelled, tokens, _, _ = prompts[True]
    order = [labelled.index(t) for t in ("Prior study:", image)] + \
            [labelled.index(t, labelled.index(image) + 1) for t in ("Current study:", image)]
    assert order == sorted(order)

    def find(seq: list[int], sub: list[int]) -> int:
        return next(i for i in range(len(seq)) if seq[i:i + len(sub)] == sub)

    assert find(tokens, prior_ids) < find(tokens, current_ids)
    with pytest.raises(StopIteration):
        find(plain_tokens, prior_ids)


def test_prior_needs_a_current_study(two_studies):
    from medgemma_cli.answering import AskOptions, _collect

    old, _ = two_studies
    with pytest.raises(MedgemmaError, match="current study"):
        _collect([], AskOptions(prior=[old]), 32, 85, 1000)


@pytest.mark.slow
def test_ask_prior_from_the_command_line(convert_tiny, two_studies, tmp_path):
    old, new = two_studies
    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "ask", "What changed?", str(new), "--prior", str(old),
                        "--model", str(convert_tiny("Q8_0")), "--max-tokens", "4", "--json"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    import json

    result = json.loads(r.stdout)
    assert result["images_sent"] == 2
    assert [Path(i["path"]).name for i in result["inputs"]] == ["old.png", "new.png"]
