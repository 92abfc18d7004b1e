"""The extra-buffer verdict: probed in a child once per machine, cached, overridable, applied to every load.

The crash that motivates it (ggml's AMX matmul on Intel Xeons) cannot be produced on every machine, so the
tests make the probe child die by a real SIGSEGV (MEDGEMMA_TEST_CRASH=probe) and check what follows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medgemma_cli.errors import MedgemmaError
from medgemma_cli.llama import loader as llama_loader
from medgemma_cli.llama.loader import buffer_types_used, load_llama, verdict


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """No verdict remembered, a verdict file of this test's own, nothing forced by the environment."""
    monkeypatch.setenv(llama_loader.VERDICT_FILE_ENV, str(tmp_path / "verdicts.json"))
    monkeypatch.delenv(llama_loader.ENV, raising=False)
    monkeypatch.delenv("MEDGEMMA_TEST_CRASH", raising=False)
    llama_loader.forget()
    yield tmp_path / "verdicts.json"
    llama_loader.forget()


@pytest.fixture(scope="module")
def probe_model(tmp_path_factory) -> Path:
    """The probe's own model: Q8_0 and Q4_K weights, which llama.cpp repacks or puts in AMX tiles where it can."""
    from medgemma_cli.llama.probe import write_model

    path = tmp_path_factory.mktemp("probe") / "probe.gguf"
    write_model(path)
    return path


def _buffers(path: Path) -> list[str]:
    with buffer_types_used() as seen:
        llm = load_llama(path, n_ctx=64, verbose=False)
    llm.close()
    return seen


def test_a_crashing_probe_turns_extra_buffers_off_and_loads_follow(fresh, monkeypatch, probe_model):
    monkeypatch.setenv("MEDGEMMA_TEST_CRASH", "probe")
    v = verdict()
    assert not v.enabled and v.source == "probe"
    assert "crashed (SIGSEGV)" in v.reason
    # kept for the next process, under this machine's key
    saved = json.loads(fresh.read_text())
    assert saved[llama_loader.machine_key()]["enabled"] is False
    # every load now leaves the weights in the plain CPU buffer
    assert set(_buffers(probe_model)) <= {"CPU", "CPU_Mapped"}


def test_a_healthy_probe_is_cached_and_not_run_again(fresh, monkeypatch, probe_model):
    v = verdict()
    assert v.source == "probe" and v.probe_seconds is not None
    if not v.enabled:  # a machine whose extra buffers really do crash or disagree: the reason says so
        assert "crashed" in v.reason or "other logits" in v.reason or "did not finish" in v.reason
        pytest.skip(f"extra buffer types are unsafe on this machine: {v.reason}")
    # with them on, llama.cpp used something beyond the plain buffer, if this CPU has one (x86 with AVX2 does)
    with_extra = _buffers(probe_model)
    info = llama_loader.llama_build()["system_info"]
    if "AVX2 = 1" in info and "REPACK = 1" in info:
        assert set(with_extra) - {"CPU", "CPU_Mapped"}, with_extra
    # a later process reads the cache: even a probe that would crash now is not run
    llama_loader.forget()
    monkeypatch.setenv("MEDGEMMA_TEST_CRASH", "probe")
    again = verdict()
    assert again.source == "cache" and again.enabled == v.enabled and again.reason == v.reason


def test_a_verdict_cached_for_other_hardware_is_not_used(fresh, monkeypatch):
    fresh.write_text(json.dumps({"another-cpu-or-build": {"enabled": True, "reason": "elsewhere"}}))
    monkeypatch.setenv("MEDGEMMA_TEST_CRASH", "probe")
    v = verdict()
    assert v.source == "probe" and not v.enabled


def test_the_environment_overrides_the_probe(fresh, monkeypatch, probe_model):
    monkeypatch.setenv("MEDGEMMA_TEST_CRASH", "probe")  # would turn them off, were it run
    monkeypatch.setenv(llama_loader.ENV, "off")
    v = verdict()
    assert (v.enabled, v.source) == (False, "environment")
    assert set(_buffers(probe_model)) <= {"CPU", "CPU_Mapped"}
    monkeypatch.setenv(llama_loader.ENV, "on")
    assert verdict().enabled and not fresh.exists()  # no probe ran
    monkeypatch.setenv(llama_loader.ENV, "sometimes")
    with pytest.raises(MedgemmaError, match="MEDGEMMA_EXTRA_BUFFERS"):
        verdict()


def test_vocabulary_only_loads_need_no_probe(fresh, probe_model):
    llm = load_llama(probe_model, vocab_only=True, verbose=False)
    assert llm.n_vocab() > 0
    assert not fresh.exists()


def test_a_hanging_probe_counts_as_unsafe(fresh, monkeypatch, tmp_path):
    """A child that never answers is stopped at the timeout and the verdict is off."""
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nsleep 60\n")
    hang.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(hang))
    v = llama_loader.run_probe("k", timeout=1.0)
    assert not v.enabled and "did not finish" in v.reason
    assert not v.cacheable  # a busy machine says nothing about the CPU: the next run probes again


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_a_probe_stopped_by_the_user_is_not_kept_as_a_crash(fresh, monkeypatch, tmp_path, sig):
    """Ctrl-C at the terminal reaches the probe child too: that is not llama.cpp crashing, and keeping it would
    turn the extra buffers off on this machine for good."""
    stopped = tmp_path / "stopped"
    stopped.write_text(f"#!/bin/sh\nkill -{sig} $$\nsleep 5\n")
    stopped.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stopped))
    v = llama_loader.run_probe("k", timeout=30.0)
    assert not v.enabled and not v.cacheable and "crashed" not in v.reason, v


def test_a_server_process_follows_the_verdict(fresh, probe_model):
    """llama-cpp-python's server loads models itself; apply_to_process() makes those loads follow the verdict."""
    code = ("import sys; from medgemma_cli.llama.loader import apply_to_process, buffer_types_used; "
            "v = apply_to_process(); import llama_cpp\n"
            "with buffer_types_used() as seen:\n"
            f"    llama_cpp.Llama({str(probe_model)!r}, n_ctx=64, verbose=False)\n"
            "import json; print(json.dumps([v.enabled, sorted(set(seen))]))")
    env = {**os.environ, "MEDGEMMA_TEST_CRASH": "probe", llama_loader.VERDICT_FILE_ENV: str(fresh)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    enabled, types = json.loads(r.stdout.strip().splitlines()[-1])
    assert enabled is False and set(types) <= {"CPU", "CPU_Mapped"}
