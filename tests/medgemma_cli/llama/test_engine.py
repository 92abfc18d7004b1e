"""The engine: what the model is given (the prompt split at its images, labels, notes), libmtmd's image
embeddings against the reference processor, and the thinking trace kept out of the streamed answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medgemma_cli.inputs.collect import collect
from medgemma_cli.inputs.images import resize_square
from medgemma_cli.llama.engine import Engine
from medgemma_cli.llama.model_files import resolve_model
from medgemma_cli.prompt import build_messages

pytestmark = pytest.mark.slow
CT = Path(get_testdata_file("CT_small.dcm", download=False))
EMRI = Path(get_testdata_file("emri_small.dcm", download=False))


def test_prompt_holds_images_slice_labels_and_note(model, note):
    files = resolve_model(model)
    inputs = collect([EMRI, note], 32)
    engine = Engine(files, n_ctx=1024)
    try:
        chunks = engine.chunks(engine.render(build_messages("Any lesion?", inputs)), [i.rgb for i in inputs.images])
        images = [p for kind, p in chunks.parts if kind == "image"]
        assert images == [4] * 10  # one chunk of 4 embeddings per slice (tiny model)
        text = "".join(engine.llm.detokenize(p, special=True).decode() for kind, p in chunks.parts if kind == "text")
        for n in range(1, 11):
            assert f"SLICE {n}" in text
        told = note.read_text().strip()
        assert told in text and text.index(told) < text.index("SLICE 1") < text.index("Any lesion?")
        assert text.count("<start_of_image>") == text.count("<end_of_image>") == 10  # added by libmtmd
        chunks.free()
    finally:
        engine.close()


def test_image_embedding_matches_the_reference_processor_for_a_non_square_image(model, hf_tiny, tiny_ckpt, tmp_path):
    """Our rendering + square resize + libmtmd equals transformers' processor + get_image_features."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor

    from medgemma_cli.inputs.images import load_rgb
    from medgemma_cli.llama.loader import load_llama
    from medgemma_cli.llama.mtmd import MtmdContext

    yy, xx = np.mgrid[0:40, 0:72]
    src = np.stack([(xx * 3) % 256, (yy * 6) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
    path = tmp_path / "wide.png"
    Image.fromarray(src).save(path)
    ours_rgb = resize_square(load_rgb(path), 32)
    llm = load_llama(model / "text.gguf", n_ctx=64, verbose=False)
    with MtmdContext(llm, model / "mmproj.gguf", threads=2) as enc:
        got = enc.encode_image(ours_rgb)
    proc = AutoImageProcessor.from_pretrained(tiny_ckpt)
    px = proc(images=Image.open(path), return_tensors="pt")["pixel_values"]
    assert tuple(px.shape) == (1, 3, 32, 32)
    with torch.no_grad():
        ref = hf_tiny.get_image_features(pixel_values=px)
    ref = getattr(ref, "pooler_output", ref)
    ref = (ref[0] if isinstance(ref, (list, tuple)) else ref).reshape(got.shape).numpy()
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos >= 0.99999, cos


def test_thinking_trace_is_stripped_unless_asked(model, monkeypatch):
    """Drive generate() with scripted logits: <unused94> thought <unused95> answer <end_of_turn>."""
    files = resolve_model(model)
    engine = Engine(files, n_ctx=128)
    try:
        n_vocab = engine._lib.llama_vocab_n_tokens(engine.vocab)
        script = [engine.think_ids[0], engine.token_id("fever"), engine.think_ids[1], engine.token_id("cough"),
                  engine.token_id("<end_of_turn>")]
        assert None not in script
        logits = iter(script)
        real = engine._lib

        class Scripted:
            def __getattr__(self, name):
                return getattr(real, name)

            @staticmethod
            def llama_get_logits_ith(ctx, i):
                import ctypes

                arr = np.zeros(n_vocab, np.float32)
                arr[next(logits)] = 1.0
                Scripted._keep = arr
                return arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))

        monkeypatch.setattr(engine, "_lib", Scripted())
        monkeypatch.setattr(engine, "_decode_tokens", lambda tokens, logits_last: None)
        shown: list[str] = []
        out = engine.generate(10, on_text=shown.append)
        assert out.text.strip() == "cough" and out.thinking.strip() == "fever" and out.stopped == "eos"
        assert "fever" not in "".join(shown)
        logits = iter(script)
        shown.clear()
        engine.generate(10, show_thinking=True, on_text=shown.append)
        assert "fever" in "".join(shown)
    finally:
        engine.close()
