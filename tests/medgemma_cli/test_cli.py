"""The command line as a user meets it: help, one-line errors, exit codes, the demo.

Most run in this process through Typer's CliRunner (fast); those about the executable itself (`--debug` anywhere
on the line, the supervised demo) start a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner


def medgemma(*args: str, home: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real executable, in a process of its own."""
    env = {**os.environ, "MEDGEMMA_HOME": str(home), "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "medgemma_cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=home)


def invoke(*args: str, home: Path) -> Result:
    """The Typer app in this process: what a command prints and its exit code, without starting Python again."""
    from medgemma_cli.cli import app

    return CliRunner().invoke(app, list(args), env={"MEDGEMMA_HOME": str(home), "COLUMNS": "120"})


def test_help_lists_commands_and_examples(tmp_path):
    r = invoke("--help", home=tmp_path)
    assert r.exit_code == 0 and "convert" in r.stdout and "demo" in r.stdout
    r = invoke("convert", "--help", home=tmp_path)
    assert r.exit_code == 0 and "Examples" in r.stdout and "--quant" in r.stdout


def test_bad_input_is_one_line_without_traceback(tmp_path):
    missing = tmp_path / "nowhere"
    r = invoke("convert", str(missing), "--out", str(tmp_path / "out"), home=tmp_path)
    assert r.exit_code == 1
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(missing) in lines[0] and "not a folder" in lines[0]
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path):
    r = medgemma("convert", str(tmp_path / "nowhere"), "--debug", home=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_convert_json_and_models(tiny_ckpt, tmp_path):
    r = invoke("convert", str(tiny_ckpt), "--quant", "q8_0", "--json", home=tmp_path)
    assert r.exit_code == 0, r.stderr
    manifest = json.loads(r.stdout)
    assert manifest["preset"] == "Q8_0" and Path(manifest["path"]).parent == tmp_path / "models"
    r = invoke("models", "--json", home=tmp_path)
    listed = json.loads(r.stdout)
    assert [m["name"] for m in listed] == [Path(manifest["path"]).name]


@pytest.mark.slow
def test_demo_runs_from_nothing(tmp_path):
    import re

    r = medgemma("demo", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stdout and "Answer:" in r.stdout and "CT_small.dcm" in r.stdout
    generated = int(re.search(r"(\d+) tokens generated", r.stdout).group(1))
    assert generated > 0  # the tiny model answered through llama.cpp (random weights: any text will do)
    assert (tmp_path / "models" / "demo-tiny" / "text.gguf").is_file()
    saved = tmp_path / "cache" / "demo-inputs" / "model-input" / "input-001.png"
    assert saved.is_file()
    from PIL import Image

    assert Image.open(saved).size == (32, 32)  # resized by us to the model's square input
    again = medgemma("demo", home=tmp_path)  # cached model; greedy decoding gives the same answer
    assert again.returncode == 0
    answer = r.stdout.split("Answer:", 1)[1].split("tokens generated", 1)[0]
    assert again.stdout.split("Answer:", 1)[1].split("tokens generated", 1)[0] == answer


def test_python_api_exposes_every_command():
    import medgemma_cli

    for name in ("convert", "ask", "ask_many", "open_session", "classify", "embed", "run_bench", "list_models",
                 "make_checkpoint", "run_demo", "run_batch", "ServerOptions", "ClassifyOptions", "write_report",
                 "cache_usage", "clear_cache"):
        assert callable(getattr(medgemma_cli, name)), name


def test_help_keeps_bracketed_defaults():
    """Rich reads "[default: …]" in a help text as markup and drops it unless escaped."""
    from medgemma_cli.cli import app

    for command, text in (("ask", "[default: the newest]"), ("batch", "[default: its only one]"),
                          ("convert", "[default: the model store]"), ("bench", "[default: 1 and the physical cores]")):
        r = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "240", "NO_COLOR": "1"})
        assert r.exit_code == 0 and text in " ".join(r.output.split()), (command, r.output[-800:])


def test_a_path_with_markup_and_control_characters_prints_as_text(tmp_path):
    """`[/]` in a path once raised rich's MarkupError with a traceback; an escape sequence in a name reached the
    terminal. The error is one line, the name shown with the control character escaped."""
    odd = tmp_path / "scans[" / "]x\x1b[31m[red]"
    r = invoke("convert", str(odd), "--out", str(tmp_path / "out"), home=tmp_path)
    assert r.exit_code == 1 and "Traceback" not in r.stderr and "MarkupError" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "\x1b" not in r.stderr
    assert "scans[/]x\\x1b[31m[red]" in lines[0] and "not a folder" in lines[0]
