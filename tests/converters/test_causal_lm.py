"""The text-only variant (Gemma3ForCausalLM, like medgemma-27b-text-it): text.gguf only, same parity."""

from __future__ import annotations

import numpy as np
import pytest

from oracle import llama_logits

pytestmark = pytest.mark.slow


def test_causal_lm_converts_and_matches(tmp_path, chat_prompt):
    torch = pytest.importorskip("torch")
    from transformers import Gemma3ForCausalLM

    from medgemma_cli.conversion import convert
    from medgemma_cli.synthetic import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "text-only", "tiny", architecture="Gemma3ForCausalLM", seed=5)
    result = convert(ckpt, tmp_path / "out", preset="F32")
    assert sorted(p.name for p in result.path.iterdir() if not p.name.startswith(".")) == ["manifest.json", "text.gguf"]
    assert set(result.manifest["files"]) == {"text.gguf"}

    model, info = Gemma3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager",
                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = chat_prompt[1]  # same tokenizer training data, so the same ids are valid here
    with torch.no_grad():
        ref = model.eval()(input_ids=torch.tensor([ids])).logits[0].double().numpy()
    got = llama_logits(result.path / "text.gguf", ids)
    assert np.abs(got - ref).max() <= 5e-3
