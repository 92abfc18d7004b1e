"""What a later question about the same study reuses: image embeddings keyed by the encoder and the exact pixels,
and the context after the images and notes, restored token for token, in a later process too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medgemma_cli.answering import AskOptions, ask
from medgemma_cli.disk_cache import DiskCache
from medgemma_cli.inputs.collect import collect
from medgemma_cli.llama.caches import EmbeddingCache, PromptCache
from medgemma_cli.llama.engine import Engine
from medgemma_cli.llama.model_files import resolve_model
from medgemma_cli.llama.session import PrefixSession

CT = Path(get_testdata_file("CT_small.dcm", download=False))
EMRI = Path(get_testdata_file("emri_small.dcm", download=False))


def test_embedding_keys_change_with_pixels_and_with_the_encoder(tmp_path):
    cache = DiskCache(tmp_path, 1 << 30)
    rgb = np.zeros((4, 4, 3), np.uint8)
    embd = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    one = EmbeddingCache(cache, "onnx:aaaa")
    stored = one.put(rgb, embd)
    assert np.array_equal(stored, embd.astype(np.float16).astype(np.float32))  # what a hit will give
    assert np.array_equal(one.get(rgb, (2, 3)), stored)
    changed = rgb.copy()
    changed[0, 0, 0] = 1
    assert one.get(changed, (2, 3)) is None
    assert EmbeddingCache(cache, "onnx:bbbb").get(rgb, (2, 3)) is None  # another vision model
    assert EmbeddingCache(cache, "mtmd:aaaa").get(rgb, (2, 3)) is None  # another encoder
    assert one.get(rgb, (4, 3)) is None  # not what this model's images hold


def _logits_after(engine: Engine, session: PrefixSession, question: str) -> np.ndarray:
    engine.rewind(session.prefix_tokens)
    engine.decode_text(question + session.suffix)
    n_vocab = engine._lib.llama_vocab_n_tokens(engine.vocab)
    return np.ctypeslib.as_array(engine._lib.llama_get_logits_ith(engine.ctx, -1), shape=(n_vocab,)).copy()


@pytest.mark.slow
def test_a_restored_context_gives_the_logits_of_a_fresh_prefill(convert_tiny, tmp_path):
    files = resolve_model(convert_tiny("Q8_0"))
    inputs = collect([EMRI], 32)
    cache = DiskCache(tmp_path / "cache", 1 << 30)
    seen = {}
    for run in ("fresh", "restored"):
        engine = Engine(files, n_ctx=1024, cache=cache)
        session = PrefixSession(engine, inputs, prompt_cache=PromptCache(cache, engine.identity()))
        session.start()
        assert session.restored == (run == "restored")
        assert engine.images_encoded == (10 if run == "fresh" else 0)
        seen[run] = (session.prefix_tokens, _logits_after(engine, session, "Any lesion?"))
        engine.close()
    assert seen["fresh"][0] == seen["restored"][0]
    assert np.array_equal(seen["fresh"][1], seen["restored"][1])


@pytest.mark.slow
def test_a_damaged_prompt_state_is_ignored_and_replaced(convert_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEMMA_HOME", str(tmp_path))
    model = convert_tiny("Q8_0")
    opts = AskOptions(max_tokens=6)
    first = ask("Describe.", [CT], model=model, options=opts)
    states = list((tmp_path / "cache" / "reuse" / "prompts").glob("*[0-9a-f]"))
    assert len(states) == 1 and not first.cache["prompt_restored"]
    states[0].write_bytes(states[0].read_bytes()[: states[0].stat().st_size // 2])  # cut in half
    again = ask("Describe.", [CT], model=model, options=opts)
    assert not again.cache["prompt_restored"] and again.cache["images_from_cache"] == 1
    assert again.tokens == first.tokens and again.answer == first.answer
    third = ask("Describe.", [CT], model=model, options=opts)  # the state was written again, whole
    assert third.cache["prompt_restored"] and third.cache["images_encoded"] == 0


@pytest.mark.slow
def test_a_later_process_reuses_the_study_and_no_cache_keeps_nothing(convert_tiny, tmp_path):
    model = convert_tiny("Q8_0")
    env = {**os.environ, "MEDGEMMA_HOME": str(tmp_path / "home")}

    def medgemma(*args: str) -> dict:
        r = subprocess.run([sys.executable, "-m", "medgemma_cli", "ask", "Describe.", str(EMRI), "--model",
                            str(model), "--max-tokens", "6", "--json", *args], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    first, second = medgemma(), medgemma()
    assert first["cache"] == {"images_from_cache": 0, "images_encoded": 10, "prompt_restored": False}
    assert second["cache"]["prompt_restored"] and second["cache"]["images_encoded"] == 0
    assert second["answer"] == first["answer"] and second["tokens"] == first["tokens"]
    other = medgemma("--system", "Be brief.")  # another prompt, the same images
    assert other["cache"] == {"images_from_cache": 10, "images_encoded": 0, "prompt_restored": False}
    reuse = tmp_path / "home" / "cache" / "reuse"
    before = sorted(p.name for p in reuse.rglob("*"))
    none = medgemma("--no-cache", "--system", "Another prompt.")
    assert none["cache"] == {"images_from_cache": 0, "images_encoded": 10, "prompt_restored": False}
    assert sorted(p.name for p in reuse.rglob("*")) == before


@pytest.mark.slow
def test_no_prompt_state_is_kept_when_identifiers_stay_in_the_prompt(convert_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDGEMMA_HOME", str(tmp_path))
    ask("Describe.", [CT], model=convert_tiny("Q8_0"), options=AskOptions(max_tokens=2, include_phi=True))
    assert not list((tmp_path / "cache" / "reuse").glob("prompts/*"))
    assert list((tmp_path / "cache" / "reuse").glob("embeddings/*.sum"))  # pixels' embeddings hold no text
