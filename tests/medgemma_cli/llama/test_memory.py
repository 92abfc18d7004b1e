"""Memory: what each run loads and holds, its cache options, and the estimate it prints before the model loads."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medgemma_cli.errors import MedgemmaError
from medgemma_cli.inputs.collect import collect
from medgemma_cli.llama import loader
from medgemma_cli.llama.engine import Engine, Timings
from medgemma_cli.llama.memory import MemoryEstimate, check_memory, kv_cache_bytes
from medgemma_cli.llama.model_files import resolve_model
from medgemma_cli.llama.onnx_vision import encode_first
from medgemma_cli.prompt import build_messages

CT = Path(get_testdata_file("CT_small.dcm", download=False))
MIB = 1024 ** 2
# MedGemma 4B's text model as llama.cpp reads it (34 layers, 5 of them global)
META_4B = {"general.architecture": "gemma3", "gemma3.block_count": 34, "gemma3.attention.head_count_kv": 4,
           "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
           "gemma3.attention.sliding_window": 1024}


@pytest.mark.parametrize("n_ctx, kv_type, swa_full, mib", [
    (1024, "f16", True, 20 + 116),  # llama.cpp's log: non-SWA 20.00 MiB, SWA 116.00 MiB
    (24576, "f16", True, 480 + 2784),
    (24576, "f16", False, 480 + 174),  # SWA cache of 1536 cells: the window plus one micro-batch
    (24576, "q8_0", False, 255 + 92.4375),
])
def test_kv_cache_size_is_what_llama_cpp_allocates(n_ctx, kv_type, swa_full, mib):
    assert kv_cache_bytes(META_4B, n_ctx, kv_type, swa_full) == int(mib * MIB)


def test_a_run_that_would_not_fit_is_refused_with_the_way_to_go_on():
    fits = MemoryEstimate(text_weights=2 << 30, kv_cache=1 << 28, compute=1 << 29, vision=1 << 29, runtime=1 << 28,
                          available=8 << 30)
    check_memory(fits)
    too_big = MemoryEstimate(fits.text_weights, fits.kv_cache, fits.compute, fits.vision, fits.runtime, 2 << 30)
    with pytest.raises(MedgemmaError, match=re.escape("--no-memory-check")):
        check_memory(too_big)


def test_extra_buffers_read_the_file_instead_of_mapping_it(monkeypatch):
    """A mapped file whose weights were also repacked is resident twice; read, it is resident once."""
    import llama_cpp

    seen: list[dict] = []
    monkeypatch.setattr(llama_cpp, "Llama", lambda path, **kw: seen.append(kw))
    loader.load_llama("x.gguf", use_extra_buffers=True, n_ctx=8)
    loader.load_llama("x.gguf", use_extra_buffers=False, n_ctx=8)
    loader.load_llama("x.gguf", use_extra_buffers=True, vocab_only=True)
    assert seen[0]["use_mmap"] is False
    assert "use_mmap" not in seen[1] and "use_mmap" not in seen[2]


def _logits(engine: Engine) -> np.ndarray:
    n_vocab = engine._lib.llama_vocab_n_tokens(engine.vocab)
    return np.ctypeslib.as_array(engine._lib.llama_get_logits_ith(engine.ctx, -1), shape=(n_vocab,)).copy()


@pytest.mark.slow
def test_onnx_route_loads_no_projector_and_gives_the_same_tokens_and_logits(convert_tiny):
    """Encoded before the text model loads, split and decoded without libmtmd, the same embeddings give
    libmtmd's tokens and exactly its logits; neither the projector nor ONNX Runtime is loaded beside the model."""
    files = resolve_model(convert_tiny("F32", "F32", "fp32"))
    inputs = collect([CT, CT], 32)
    images = [i.rgb for i in inputs.images]
    embeddings, _ = encode_first(files.vision_onnx, images, 2)
    onnx = Engine(files, n_ctx=256, vision_backend="onnx")
    mtmd = Engine(files, n_ctx=256, vision_backend="mtmd")
    mtmd.mtmd.encode = lambda chunks, index: embeddings[sum(  # type: ignore[union-attr]
        1 for kind, _ in chunks.parts[:index] if kind == "image")]
    logits = {}
    for name, engine in (("onnx", onnx), ("mtmd", mtmd)):
        chunks = engine.chunks(engine.render(build_messages("What is shown?", inputs)), images,
                               embeddings if name == "onnx" else None)
        if name == "onnx":
            parts = chunks.parts
        else:
            assert chunks.parts == parts
        engine.prefill(chunks, Timings())
        logits[name] = _logits(engine)
        chunks.free()
    assert np.array_equal(logits["onnx"], logits["mtmd"])
    assert onnx.mtmd is None and onnx.onnx_vision is None
    onnx.release_vision()
    with pytest.raises(MedgemmaError, match="released"):
        onnx.chunks(onnx.render(build_messages("?", inputs)), images)
    onnx.close()
    mtmd.close()


@pytest.mark.slow
def test_encoding_first_or_during_the_prompt_gives_the_same_answer(model):
    from medgemma_cli.answering import AskOptions, ask

    first = ask("What is shown?", [CT], model=model, options=AskOptions(max_tokens=8))
    files = resolve_model(model)
    engine = Engine(files, n_ctx=first.model["n_ctx"])
    inputs = collect([CT], files.vision["image_size"])
    from medgemma_cli.llama.session import PrefixSession

    session = PrefixSession(engine, inputs)
    session.start()  # ONNX Runtime loads here, beside the text model
    assert engine.onnx_vision is not None
    assert session.ask("What is shown?", 8).answer == first.answer
    engine.close()


@pytest.mark.slow
def test_window_sized_cache_gives_the_same_logits(model):
    """Beyond the sliding window (16 tokens in the tiny model), a window-sized cache computes what the full one
    does; and a one-question ask uses it."""
    from medgemma_cli.answering import AskOptions, ask, ask_many

    files = resolve_model(model)
    prompt = " ".join(f"word{i}" for i in range(60))  # ~300 tokens
    logits = {}
    for full in (True, False):
        engine = Engine(files, n_ctx=1024, swa_full=full)
        engine.decode_text(prompt)
        logits[full] = _logits(engine)
        engine.close()
    assert np.array_equal(logits[True], logits[False])
    one = ask(prompt, [CT], model=model, options=AskOptions(max_tokens=8))
    two = ask_many([prompt, "Anything else?"], [CT], model=model, options=AskOptions(max_tokens=8))
    assert one.model["swa_full"] is False and two[0].model["swa_full"] is True
    assert one.answer == two[0].answer


KV_Q8_TOLERANCE = 0.1  # largest logit difference allowed for a q8_0 cache against f16 (tiny model: see README)


@pytest.mark.slow
def test_q8_0_cache_stays_within_the_stated_tolerance(model):
    files = resolve_model(model)
    prompt = " ".join(f"word{i}" for i in range(60))
    logits = {}
    for kv in ("f16", "q8_0"):
        engine = Engine(files, n_ctx=1024, kv_type=kv)
        engine.decode_text(prompt)
        logits[kv] = _logits(engine)
        engine.close()
    diff = float(np.abs(logits["q8_0"] - logits["f16"]).max())
    assert 0 < diff <= KV_Q8_TOLERANCE, diff
    with pytest.raises(MedgemmaError, match="KV cache type"):
        Engine(files, n_ctx=64, kv_type="q4_0")


def test_the_estimate_counts_one_block_of_attention_scores(convert_tiny):
    """vision.onnx written in query blocks holds one block's scores and softmax: the manifest says how many
    queries a block has, and the estimate counts heads × block × patches floats twice instead of heads × patches²
    (files converted before the blocks have no entry and keep the whole count; libmtmd is not ONNX Runtime).
    ONNX Runtime's weights are vision.onnx.data's as well as the graph's."""
    from dataclasses import replace

    from medgemma_cli.converters.vision_onnx import ATTENTION_BLOCK
    from medgemma_cli.llama.memory import vision_bytes

    files = resolve_model(convert_tiny("Q8_0"))
    assert files.vision_onnx_attention_block == ATTENTION_BLOCK
    heads, patches, ffn = 2, (32 // 4) ** 2, 256  # the tiny shape's vision tower
    data = files.vision_onnx.with_name("vision.onnx.data")
    weights = files.vision_onnx.stat().st_size + data.stat().st_size
    assert data.stat().st_size > files.vision_onnx.stat().st_size
    mlp = 2 * patches * ffn * 4
    assert vision_bytes(files, "onnx") == weights + 2 * heads * patches * patches * 4 + mlp  # 64 patches: one block
    blocks_of_16 = replace(files, vision_onnx_attention_block=16)
    assert vision_bytes(blocks_of_16, "onnx") == weights + 2 * heads * 16 * patches * 4 + mlp
    assert vision_bytes(replace(files, vision_onnx_attention_block=None), "onnx") == vision_bytes(files, "onnx")
    assert vision_bytes(blocks_of_16, "mtmd") == vision_bytes(files, "mtmd") == \
        files.mmproj.stat().st_size + 2 * heads * patches * patches * 4 + mlp
