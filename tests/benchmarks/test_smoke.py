"""Every benchmark script runs in its `--smoke` mode (tiny shapes, seconds) and reports the figures its real run
reports, so a benchmark broken by a change in the package fails here instead of when someone next wants its
figures (issue #16: siglip_448.py had failed at once on an import from a test module that had moved).

Each runs as the README says, `python benchmarks/NAME.py --smoke`, in a process that cannot import from tests/:
benchmarks import nothing from the tests (what both need lives in the package, e.g. medgemma_cli.synthetic).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from medgemma_cli.testing.fuzz import KINDS

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
TESTS = ROOT / "tests"
NO_TESTS_PACKAGE = "raise ImportError('benchmarks import nothing from tests/: what both need lives in the package')\n"


def scripts() -> list[str]:
    """The benchmark scripts: the files of benchmarks/ with a __main__ block (the others are their helpers,
    llama_cpp_reference.py and smoke.py, run through the scripts)."""
    return sorted(p.stem for p in BENCHMARKS.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


def run_script(script: Path, tmp_path: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` with tests/ on no import path: PYTHONPATH keeps only what leads to the package (a
    checkout's root here), minus tests/, and a `tests` package that refuses to import hides the checkout's tests/
    folder, which Python would otherwise import as a namespace package from that root."""
    shim = tmp_path / "no-tests"
    (shim / "tests").mkdir(parents=True, exist_ok=True)
    (shim / "tests" / "__init__.py").write_text(NO_TESTS_PACKAGE)
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and not Path(p).resolve().is_relative_to(TESTS)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), *kept]), "MEDGEMMA_HOME": str(tmp_path / "home"),
           "PYTHONUNBUFFERED": "1"}
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


# ------------------------------------------------------------------------------------------- what each reports


def keys(*names: str, **values: Any) -> dict[str, Any]:
    """A record holding these keys (any value) and these values."""
    return {**dict.fromkeys(names, ...), **values}


TOK_S = keys("median", "min", "max")
# Per script: records its output must hold (JSON lines; a record matches when it holds every key, with the value
# given unless that is `...`, nested dicts alike). The smoke run's figures mean nothing; their presence does.
FIGURES: dict[str, list[dict[str, Any]]] = {
    "ask_4b": [
        keys("machine_cores", "threads"),
        *(keys("tokens", "stopped", mmproj=mm, ask_timings=keys("load_s", "image_encode_s", "first_token_s",
                                                                "decode_tokens_per_s")) for mm in ("F16", "Q8_0")),
        keys("layouts", same_tensor_bytes=True),
        keys("decode_tokens_per_s_ours", "decode_tokens_per_s_bare_llama_cpp",
             "decode_tokens_per_s_bare_on_llama_cpp_file", "ours_vs_bare", "ours_vs_bare_on_llama_cpp_file",
             "our_file_vs_llama_cpp_file", "bandwidth_gbps", "bandwidth_bound_tokens_per_s", "ours_vs_bound"),
    ],
    "attention_4b": [
        keys("cpu", "cores", "threads", "load", "patches", "heads", "layers", "converter_block"),
        *(keys("peak_bytes", "after_load_bytes", "s_per_image", "vision_onnx_bytes", preset=p, attention_block=0)
          for p in ("fp32", "int8")),
        *(keys("peak_bytes", "s_per_image", "max_abs_diff_vs_block0", "cosine_vs_block0", preset=p,
               attention_block=24) for p in ("fp32", "int8")),
        *(keys("cosine_vs_fp32_block0", preset="int8", attention_block=b) for b in (0, 24)),
        *(keys(preset=p, summary=keys("peak_bytes_block0", "lowest_peak_block", "saved_bytes"))
          for p in ("fp32", "int8")),
        *(keys("peak_above_inputs_bytes", "s", "max_abs_err_vs_float64", one_layer=kind, attention_block=b)
          for kind, b in (("standard ops", 0), ("standard ops", 24), ("MultiHeadAttention", 0))),
    ],
    "batch_tiny": [
        keys("machine_cores", "units", "questions", "max_tokens", "repeats"),
        keys("model_alone_s", "batch_wall_s", "model_in_batch_s", "worker_process_s", "worker_idle_s",
             "worker_vs_model_in_batch", "overhead_vs_model_in_batch", "overhead_vs_model_alone", "units_per_s",
             threads=1),
        *(keys("units", "records", "wall_s", "units_per_s", "requests_per_s", mode="server", workers=w, failed=0)
          for w in (1, 2, 4)),
    ],
    "cache_reuse": [
        *(keys("wall_s", "load_s", "first_token_s", "image_encode_s", "estimate", "prompt_tokens", run=r,
               cache=keys("images_from_cache", "images_encoded", "prompt_restored"))
          for r in ("first", "again", "other_prompt", "estimated")),
        keys("second_first_token_vs_first", "second_wall_vs_first", "estimate_errors", other_prompt_encoded=0),
    ],
    "convert_4b": [
        keys("machine_cores", "source_bytes", shape="tiny"),
        *(keys("wall_s", "peak_rss_mb", "output_bytes", "text_types", "rel_rms", step=f"convert {p}")
          for p in ("BF16", "Q8_0", "Q4_K_M")),
        keys("wall_s", "peak_rss_mb", "output_bytes", step="llama_model_quantize Q4_K_M"),
        keys("one_pass_s", "two_pass_s", "ratio", "one_pass_peak_mb", "two_pass_peak_mb", "two_pass_extra_disk_bytes",
             summary="Q4_K_M"),
    ],
    "decode_vs_llama_cpp": [  # the timed runs are llama_cpp_reference.py's
        keys("layouts", same_tensor_bytes=True),
        *(keys("round", "others_cpu", "quiet", "load_s", "prompt_tok_s", "decode_tok_s", "buffers", file=f,
               extra_buffers=False) for f in ("ours", "llama.cpp")),
        keys("cpu", "cores", "preset", "threads", summary={
            "ours, extra buffers off": keys("prompt_tok_s", "decode_tok_s", "rounds", "prompt_tok_s_ratio_to_llama.cpp",
                                            "decode_tok_s_ratio_to_llama.cpp"),
            "llama.cpp, extra buffers off": keys("prompt_tok_s", "decode_tok_s")}),
    ],
    "documents": [
        keys("cpu", "cores"),
        keys("pages", "median_s", "pages_per_s", size_px=896),
    ],
    "slides": [
        keys("cpu", "cores"),
        *(keys("slide", "patches", "tissue", "peak_rss_mb", "rss_after_imports_mb", reader=r, mode="stream",
               level=1) for r in ("dicom", "openslide")),
        *(keys("slide", "patches", "peak_rss_mb", reader=r, mode="collect") for r in ("dicom", "openslide")),
        keys("patches_per_s", "mask_s", "level_size"),
    ],
    "extra_buffers": [
        keys("cpu", "cores", "threads", verdict=keys("enabled", "source", "reason")),
        *(keys("buffer_types", shape="tiny", preset=p, extra_buffers=False, prompt_tok_s=TOK_S, decode_tok_s=TOK_S)
          for p in ("Q4_K_M", "Q8_0")),
    ],
    "memory_4b": [
        keys("cpu", "cores", "threads", "text_gguf_bytes", "mmproj_bytes", "vision_onnx_bytes"),
        *(keys("peak_bytes", run=f"text model alone, extra buffers, file {how}") for how in ("mapped", "read")),
        *(keys("peak_bytes", "prompt_tokens", images=n, run="ask (f16 KV)",
               estimate=keys("peak", "text_weights", "kv_cache", "compute", "vision")) for n in (1, 2)),
        keys("peak_bytes", images=1, run="ask --kv-type q8_0"),
        *(keys("peak_bytes", "prompt_tokens", images=n, run="bare llama-cpp-python + libmtmd") for n in (1, 2)),
        *(keys("peak_bytes", run=f"onnx encoder alone, arena {a}") for a in ("on", "off")),
    ],
    "siglip_448": [
        keys("machine_cores", "threads", "torch_fp32_s_per_image", "torch_images_per_s"),
        *(keys("s_per_image", "images_per_s", "speedup_vs_torch_fp32", "min_cosine_vs_torch", "convert_s",
               "vision_onnx_bytes", preset=p) for p in ("fp32", "int8", "q4")),
    ],
    "vision_4b": [
        keys("converted_with_vision_onnx_s", "peak_rss_mb"),
        keys("machine_cores", "threads"),
        *(keys("image_encode_s", "first_token_s", "load_s", vision=v) for v in ("onnx int8", "mtmd F16", "mtmd Q8_0")),
        keys("five_questions_one_encoding_s", "five_separate_asks_s", "ratio"),
    ],
    # fuzz_inputs prints Markdown tables: checked by _check_fuzz_tables
}
NEEDS_TORCH = {"siglip_448"}


def matches(record: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(record, dict) and all(k in record and matches(record[k], v) for k, v in want.items())
    return want is ... or record == want


def json_lines(stdout: str) -> list[dict[str, Any]]:
    records = []
    for line in stdout.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"not a JSON line in the output: {line[:200]!r}")
    return records


def markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """{heading: rows as {column: cell}} for each `## heading` followed by a Markdown table."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, header = "", None
    for line in text.splitlines():
        if line.startswith("## "):
            heading, header = line[3:].strip(), None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                tables[heading] = []
            elif not set("".join(cells)) <= {"-"}:
                tables[heading].append(dict(zip(header, cells, strict=True)))
    return tables


def _check_fuzz_tables(stdout: str) -> None:
    assert re.search(r"^> smoke run: .*no figure of it means anything", stdout, re.M), stdout[:500]
    assert re.search(r"^# Hostile inputs — .+, \d+ cores$", stdout, re.M)  # the CPU, named with every figure
    tables = markdown_tables(stdout)
    bombs = tables["Decompression bombs"]
    assert len(bombs) == 7, bombs
    for row in bombs:
        assert set(row) == {"input", "outcome", "peak RSS", "time"}
        assert re.fullmatch(r"\d+ MB", row["peak RSS"]) and re.fullmatch(r"\d+\.\d s", row["time"]), row
        assert row["outcome"].startswith(("refused: ", "read (", "FAULT: ")), row
    (title, campaign), = ((t, rows) for t, rows in tables.items() if t.startswith("Fuzz campaign"))
    assert [r["kind"] for r in campaign] == [*KINDS, "pydicom's own files", "**all**"], title
    counts = ("cases", "read", "refused (InputError)", "faults")
    for row in campaign:
        assert all(row[c].isdigit() for c in counts), row
    total = campaign[-1]
    assert int(total["cases"]) == sum(int(r["cases"]) for r in campaign[:-1]) > 0
    assert int(total["cases"]) == sum(int(total[c]) for c in counts[1:])
    assert re.search(r"^\d+ s in all$", stdout, re.M)


# ------------------------------------------------------------------------------------------------------ tests


def test_every_script_is_checked():
    """A new benchmark script gets its --smoke run here and must say what its output holds."""
    assert set(scripts()) == {*FIGURES, "fuzz_inputs"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.uses_network) if n == "batch_tiny" else n
                                  for n in scripts()])  # batch_tiny's server mode talks to 127.0.0.1
def test_smoke_run(name, tmp_path):
    if name in NEEDS_TORCH and not (importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")):
        pytest.skip("needs the test extra's torch and transformers (the reference it is timed against)")
    r = run_script(BENCHMARKS / f"{name}.py", tmp_path, "--smoke")
    assert r.returncode == 0, f"{name}.py --smoke failed:\n{r.stderr[-4000:]}"
    if name == "fuzz_inputs":
        _check_fuzz_tables(r.stdout)
        return
    records = json_lines(r.stdout)
    assert "no figure of it means anything" in records[0].get("smoke", ""), records[:1]
    for want in FIGURES[name]:
        assert any(matches(rec, want) for rec in records), f"no record holds {want}:\n{r.stdout[-4000:]}"


@pytest.mark.parametrize("line", ["from tests.oracle import gguf_tensors", "import oracle",
                                  "import tests.medgemma_cli.test_bench"])
def test_a_script_importing_from_tests_fails(line, tmp_path):
    """The premise of the smoke runs: a benchmark that imports from tests/ fails them, whatever PYTHONPATH the
    suite runs with (a checkout's root on it makes tests/ importable as a namespace package)."""
    assert (TESTS / "oracle.py").is_file() and (TESTS / "medgemma_cli" / "test_bench.py").is_file()
    script = tmp_path / "bench_from_tests.py"
    script.write_text(f"{line}\nprint('imported')\n")
    r = run_script(script, tmp_path)
    assert r.returncode != 0 and "imported" not in r.stdout
    assert "ImportError" in r.stderr or "ModuleNotFoundError" in r.stderr, r.stderr[-2000:]


def test_no_script_reaches_into_tests_by_path():
    """The other way in: a script that puts tests/ on its own path (as siglip_448.py once did)."""
    for p in BENCHMARKS.glob("*.py"):
        assert not re.search(r"""["']tests["'/\\]""", p.read_text()), f"{p.name} names the tests/ folder"


def test_the_package_stays_importable_without_tests(tmp_path):
    """...while the package the benchmarks need is found, from a checkout or installed."""
    script = tmp_path / "bench_package.py"
    script.write_text("import medgemma_cli.synthetic, medgemma_cli.kernels.ggml\nprint(medgemma_cli.__file__)\n")
    r = run_script(script, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    import medgemma_cli

    found = Path(r.stdout.strip())  # the checkout's, or the installed copy of it (CI installs the package)
    assert found.parts[-2:] == ("medgemma_cli", "__init__.py")
    assert found.read_bytes() == Path(medgemma_cli.__file__).read_bytes()
