"""Every key layout in the wild converts to identical tensors; sharded checkpoints too."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from medgemma_cli.conversion import convert
from medgemma_cli.synthetic import LAYOUTS, make_checkpoint


def tensor_bytes(path: Path) -> dict[str, tuple[int, bytes]]:
    return {t.name: (int(t.tensor_type), np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("layout-ref")
    ckpt = make_checkpoint(root / "ckpt", "tiny", layout="hf4", seed=11)
    out = convert(ckpt, root / "out", preset="Q8_0").path
    return {"text": tensor_bytes(out / "text.gguf"), "mmproj": tensor_bytes(out / "mmproj.gguf")}


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "hf4"])
def test_layout_gives_identical_tensors(tmp_path, reference, layout):
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", layout=layout, seed=11)
    out = convert(ckpt, tmp_path / "out", preset="Q8_0").path
    assert tensor_bytes(out / "text.gguf") == reference["text"]
    assert tensor_bytes(out / "mmproj.gguf") == reference["mmproj"]


def test_sharded_checkpoint_with_index(tmp_path, reference):
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=11, shard_bytes=3_000_000)
    assert len(list(ckpt.glob("*.safetensors"))) > 2 and (ckpt / "model.safetensors.index.json").is_file()
    out = convert(ckpt, tmp_path / "out", preset="Q8_0").path
    assert tensor_bytes(out / "text.gguf") == reference["text"]
    assert tensor_bytes(out / "mmproj.gguf") == reference["mmproj"]


def test_checkpoint_saved_by_transformers(tmp_path, reference):
    """What transformers itself writes (save_pretrained of the loaded model) converts to the same tensors."""
    torch = pytest.importorskip("torch")
    from transformers import Gemma3ForConditionalGeneration

    src = make_checkpoint(tmp_path / "ckpt", "tiny", seed=11)
    model = Gemma3ForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "chat_template.jinja", "preprocessor_config.json", "processor_config.json"):
        (saved / name).write_bytes((src / name).read_bytes())
    out = convert(saved, tmp_path / "out", preset="Q8_0").path
    assert tensor_bytes(out / "text.gguf") == reference["text"]
    assert tensor_bytes(out / "mmproj.gguf") == reference["mmproj"]
