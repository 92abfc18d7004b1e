"""JSON Schema → llama.cpp grammar, and sampling under it: a random-weight model still writes valid JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medgemma_cli.errors import InputError
from medgemma_cli.llama import grammar as G


def _as_regex(gbnf: str) -> str:
    """digits_between's output uses only "d" literals, [a-b] classes, ( | ) and spaces: a regex once unquoted."""
    return gbnf.replace('"', "").replace(" ", "")


@pytest.mark.parametrize(("lo", "hi"), [(0, 1000), (0, 9), (5, 123), (17, 17), (10, 99), (99, 1001), (0, 0),
                                        (250, 749)])
def test_integer_ranges_match_exactly_the_numbers_between(lo, hi):
    pattern = re.compile(_as_regex(G.digits_between(lo, hi)))
    accepted = {n for n in range(1300) if pattern.fullmatch(str(n))}
    assert accepted == set(range(lo, min(hi, 1299) + 1))
    for leading_zero in ("01", "007", "0100"):
        assert not pattern.fullmatch(leading_zero)


def test_bounded_integers_reach_the_grammar():
    rules = G.schema_rules({"type": "integer", "minimum": 0, "maximum": 1000})
    assert '"1" "0" "0" "0"' in rules or "1000" in rules.replace('" "', "")
    # llama-cpp-python's own converter leaves the bounds open (any number of digits)
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    assert "integral-part" in json_schema_to_gbnf(json.dumps({"type": "integer", "minimum": 0, "maximum": 1000}))
    assert "integral-part" not in rules


def test_longest_json_of_a_bounded_schema():
    schema = {"type": "array", "maxItems": 2, "items": {
        "type": "object", "additionalProperties": False, "required": ["n", "s"],
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 1000}, "s": {"const": "ab"}}}}
    longest = json.dumps([{"n": 1000, "s": "ab"}] * 2)  # json.dumps puts the spaces the grammar allows
    bound = G.max_chars(schema)
    assert bound is not None and bound >= len(longest)
    assert G.max_chars({"type": "string"}) is None  # unbounded: nothing to reserve on


@pytest.mark.parametrize(("content", "problem"), [
    ("{not json", "not JSON"),
    ("[1, 2]", "a JSON Schema is a JSON object"),
    ('{"type": "no-such-type"}', "cannot be turned into a grammar"),
])
def test_bad_schema_files_are_one_line_about_the_file(tmp_path, content, problem):
    f = tmp_path / "s.json"
    f.write_text(content)
    with pytest.raises(InputError, match=problem) as e:
        G.load_schema(f)
    assert e.value.path == f


SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["finding", "severity", "sites", "urgent"],
    "properties": {
        "finding": {"type": "string", "maxLength": 24},
        "severity": {"enum": ["none", "mild", "moderate", "severe"]},
        "sites": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "additionalProperties": False, "required": ["side", "percent"],
            "properties": {"side": {"enum": ["left", "right"]},
                           "percent": {"type": "integer", "minimum": 0, "maximum": 100}}}},
        "urgent": {"type": "boolean"},
    },
}
PROMPTS = [f"Describe finding number {i} on this study{'!' * (i % 3)} {'Is it urgent?' if i % 2 else ''}"
           for i in range(20)]


@pytest.fixture(scope="module")
def engine(convert_tiny):
    from medgemma_cli.llama.engine import Engine
    from medgemma_cli.llama.model_files import resolve_model

    e = Engine(resolve_model(convert_tiny("Q8_0"), None, None), n_ctx=1024)
    yield e
    e.close()


def _generate(engine, prompt: str, constraint: G.Constraint, max_tokens: int = 300, temperature: float = 0.0,
              seed: int = 0):
    engine.reset()
    engine.decode_text(engine.render([{"role": "user", "content": [{"type": "text", "text": prompt}]}]))
    return engine.generate(max_tokens, temperature, seed, constraint=constraint)


@pytest.mark.slow
def test_a_random_model_writes_valid_json_for_20_prompts(engine):
    jsonschema = pytest.importorskip("jsonschema")
    answers = []
    for i, prompt in enumerate(PROMPTS):
        out = _generate(engine, prompt, G.json_answer(SCHEMA), temperature=0.0 if i < 10 else 1.0, seed=i)
        assert out.stopped == "eos", (prompt, out.text)
        data = json.loads(out.text)
        jsonschema.validate(data, SCHEMA)
        answers.append(out.text)
    assert len(set(answers)) > 1  # the prompts and seeds do change the answers: the grammar is not one string
    # without the grammar the same model writes no JSON at all
    engine.reset()
    engine.decode_text(engine.render([{"role": "user", "content": [{"type": "text", "text": PROMPTS[0]}]}]))
    free = engine.generate(60)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)


@pytest.mark.slow
def test_the_thinking_trace_is_kept_apart(engine):
    """A grammar makes the random model open and close MedGemma's thinking markers, as a real one does."""
    forced = G.raw_grammar('root ::= <unused94> "thought" [a-z ]{2,30} <unused95> "The answer" [a-z ]{0,10}')
    out = _generate(engine, "Think first.", forced, max_tokens=80)
    assert out.stopped == "eos"
    assert out.thinking.startswith("thought") and out.text.startswith("The answer")
    assert "thought" not in out.text and "<unused9" not in out.text


@pytest.mark.slow
def test_thinking_is_closed_in_time_for_the_json(engine):
    """A prelude that would use up every token is cut `reserve` tokens before the end, and the JSON follows."""
    schema = {"type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 1000}}
    reserve = G.max_chars(schema) + 2
    out = _generate(engine, "Think, then answer.", G.json_answer(schema, think=True, reserve=reserve),
                    max_tokens=reserve + 15)
    if out.thinking:  # the model chose to think (greedy: it does, or the assertions below still hold)
        assert out.closed_early
    assert out.stopped == "eos"
    assert isinstance(json.loads(out.text), list)
    located = G.reasoned_answer(schema, reserve + 30)
    out = _generate(engine, "Reason, then answer.", located, max_tokens=reserve + 40)
    assert out.stopped == "eos" and out.closed_early
    fenced = out.text.split("Final Answer:", 1)[1].strip()
    assert fenced.startswith("```json") and fenced.endswith("```")
    assert isinstance(json.loads(fenced[len("```json"):-3]), list)


@pytest.mark.slow
def test_ask_schema_from_the_command_line(convert_tiny, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = tmp_path / "finding.schema.json"
    schema.write_text(json.dumps(SCHEMA))
    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "ask", "Any effusion?", "--model",
                        str(convert_tiny("Q8_0")), "--schema", str(schema), "--json", "--max-tokens", "300"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    jsonschema.validate(result["parsed"], SCHEMA)
    assert json.loads(result["answer"]) == result["parsed"] and result["parse_error"] is None


@pytest.mark.slow
def test_an_answer_cut_by_max_tokens_is_said_not_patched(convert_tiny, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "ask", "Any effusion?", "--model",
                        str(convert_tiny("Q8_0")), "--schema", str(schema), "--max-tokens", "5"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1
    assert "not complete JSON" in r.stderr and "Traceback" not in r.stderr


def test_schema_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "ask", "q", "--schema", str(bad)],
                       capture_output=True, text=True, timeout=120, cwd=Path(tmp_path))
    assert r.returncode != 0
    assert str(bad) in r.stderr and "not JSON" in r.stderr and "Traceback" not in r.stderr
