"""`medgemma bench` on a tiny synthetic model: the figures exist, are consistent, and the model is real GGUF."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import pytest

from medgemma_cli.bench import (
    BenchReport,
    end_to_end,
    memory_bandwidth,
    model_bytes,
    physical_cores,
    recommend,
    synthetic_gguf,
    text_plan,
)


def test_synthetic_gguf_follows_the_policy_and_loads(tmp_path):
    path = synthetic_gguf("tiny", "Q4_K_M", tmp_path)
    r = gguf.GGUFReader(path)
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type) for t in r.tensors}
    assert types == {name: q for name, _, q in text_plan("tiny", "Q4_K_M")}
    assert sum(int(t.n_bytes) for t in r.tensors) == model_bytes("tiny", "Q4_K_M")
    assert synthetic_gguf("tiny", "Q4_K_M", tmp_path) == path  # cached
    e = end_to_end(path, "tiny", "Q4_K_M", threads=1, prompt_tokens=8, decode_tokens=4)
    assert e.prompt_tokens_per_s > 0 and e.decode_tokens_per_s > 0 and e.model_bytes == model_bytes("tiny", "Q4_K_M")


def test_real_shape_sizes():
    # the 4B Q4_K_M text model: 34 layers of Q4_K/Q6_K plus a Q6_K embedding, about 2.5 GB
    assert 2.3e9 < model_bytes("4b", "Q4_K_M") < 2.7e9
    assert model_bytes("27b", "Q8_0") > 2 * model_bytes("27b", "Q4_K_M") * 0.8


def test_machine_facts():
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
    assert memory_bandwidth(1, size_mb=64, repeats=1) > 0.1


def test_recommendation_reflects_memory():
    small = BenchReport(2, 2, 8 << 30, {2: 20.0})
    big = BenchReport(2, 2, 64 << 30, {2: 20.0})
    assert not recommend(small)["fits"]["27b Q4_K_M"] and recommend(big)["fits"]["27b Q4_K_M"]
    assert recommend(big)["decode_bound_tokens_per_s"]["4b Q4_K_M"] == pytest.approx(
        20e9 / model_bytes("4b", "Q4_K_M"), rel=0.01)


@pytest.mark.slow
def test_bench_cli_json(tmp_path):
    env = {**os.environ, "MEDGEMMA_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "bench", "--shape", "tiny", "--threads", "1",
                        "--prompt-tokens", "8", "--decode-tokens", "4", "--json"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert set(report["bandwidth_gbps"]) == {"1"}
    assert {m["type"] for m in report["matmul"]} == {"Q4_K", "Q6_K", "Q8_0", "F16"}
    (e,) = report["end_to_end"]
    assert e["shape"] == "tiny" and e["ratio_to_bound"] == pytest.approx(
        e["decode_tokens_per_s"] / e["bandwidth_bound_tokens_per_s"], rel=0.02)
    assert report["recommendation"]["preset"] == "Q4_K_M"
