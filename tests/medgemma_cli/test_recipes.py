"""The recipes' wording in one place, replaceable by the user; the thinking switch and its token budgets."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medgemma_cli import recipes
from medgemma_cli.answering import AskOptions
from medgemma_cli.errors import InputError
from medgemma_cli.inputs.collect import Collected
from medgemma_cli.prompt import build_messages


def test_the_localization_prompt_is_the_notebooks(monkeypatch, tmp_path):
    monkeypatch.setenv(recipes.PROMPTS_ENV, str(tmp_path))
    text = recipes.fill("locate", finding="right clavicle")
    assert text.startswith("Instructions:\nThe following user query will require outputting bounding boxes.")
    assert "\n\nQuery:\nWhere is the right clavicle? Don't give a final answer without reasoning." in text
    assert '```json[{"box_2d": [800, 3, 840, 471], "label": "car"}, ' in text  # the notebook's {{ }} are single
    assert text.endswith('The object needs a "box_2d" and "label" key. Answer:')


def test_a_users_template_replaces_the_recipes(monkeypatch, tmp_path):
    monkeypatch.setenv(recipes.PROMPTS_ENV, str(tmp_path))
    (tmp_path / "locate.txt").write_text("Find the {finding}. Reply with ```json[...]```.", encoding="utf-8")
    assert recipes.fill("locate", finding="heart") == "Find the heart. Reply with ```json[...]```."
    (tmp_path / "locate.txt").write_text("Find it.", encoding="utf-8")
    with pytest.raises(InputError, match=r"must contain \{finding\}") as e:
        recipes.fill("locate", finding="heart")
    assert e.value.path == tmp_path / "locate.txt"
    (tmp_path / "think.txt").write_text("Think step by step.\n", encoding="utf-8")
    assert recipes.with_thinking("You are a radiologist.") == "Think step by step. You are a radiologist."
    rows = {r["name"]: r for r in recipes.describe()}
    assert rows["think"]["replaced"] and not rows["compare"]["replaced"]


def test_thinking_switch_and_budgets(monkeypatch, tmp_path):
    monkeypatch.setenv(recipes.PROMPTS_ENV, str(tmp_path))
    opts = AskOptions(think=True, system="You are a radiologist.")
    assert opts.system_text() == "SYSTEM INSTRUCTION: think silently if needed. You are a radiologist."
    assert AskOptions(think=True).system_text() == "SYSTEM INSTRUCTION: think silently if needed."
    assert AskOptions(system="x").system_text() == "x"
    assert (opts.budget(images=True), opts.budget(images=False)) == (1500, 2000)  # the recipe's
    assert AskOptions().budget(images=True) == 512 and AskOptions(max_tokens=9, think=True).budget(True) == 9
    messages = build_messages("Which antibiotic?", Collected(), opts.system_text())
    assert messages[0] == {"role": "system", "content": [{"type": "text", "text": opts.system_text()}]}


def test_prompts_command(monkeypatch, tmp_path):
    env = {"MEDGEMMA_PROMPTS": str(tmp_path)}
    import os

    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "prompts", "compare"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **env})
    assert r.returncode == 0 and r.stdout == recipes.TEMPLATES["compare"].text
    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "prompts", "nope"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, **env})
    assert r.returncode != 0 and "no template 'nope'" in r.stderr


@pytest.mark.slow
def test_think_keeps_the_trace_apart_through_ask(convert_tiny):
    """The random model, made by a grammar to think as MedGemma 1.5 does, then answer: the trace is left out
    of the answer, and shown only when asked."""
    from medgemma_cli.answering import ask
    from medgemma_cli.llama.grammar import raw_grammar

    forced = raw_grammar('root ::= <unused94> "thought" [a-z ]{2,20} <unused95> "Final answer" [a-z ]{0,8}')
    model = convert_tiny("Q8_0")
    hidden = ask("Which antibiotic?", model=model, options=AskOptions(think=True, constraint=forced, max_tokens=60))
    shown = ask("Which antibiotic?", model=model, options=AskOptions(think=True, constraint=forced, max_tokens=60,
                                                                       show_thinking=True))
    assert hidden.answer == shown.answer and hidden.answer.startswith("Final answer")
    assert "thought" not in hidden.answer and hidden.thinking is None
    assert shown.thinking is not None and shown.thinking.startswith("thought")
