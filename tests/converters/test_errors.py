"""Bad input is refused with a message naming the file, and nothing is left behind."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from medgemma_cli.conversion import convert
from medgemma_cli.converters.safetensors_io import read_header, save
from medgemma_cli.errors import InputError, OutputError, UnsupportedModelError


@pytest.fixture
def ckpt(tiny_ckpt: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, copy)
    return copy


def _edit_config(folder: Path, fn) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(folder: Path, fn) -> None:
    """Rewrite model.safetensors with fn(dict name -> (dtype, array)) applied."""
    from medgemma_cli.converters.safetensors_io import SafetensorsFile

    f = SafetensorsFile(folder / "model.safetensors")
    tensors = {n: (e.dtype, f.read(n)) for n, e in f.entries.items()}
    f.close()
    fn(tensors)
    save(folder / "model.safetensors", tensors)


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_missing_config(ckpt, tmp_path):
    (ckpt / "config.json").unlink()
    with pytest.raises(InputError, match=r"config\.json: missing"):
        convert(ckpt, tmp_path / "out")
    _assert_nothing_left(tmp_path / "out")


def test_missing_tokenizer(ckpt, tmp_path):
    (ckpt / "tokenizer.model").unlink()
    with pytest.raises(InputError, match=r"tokenizer\.model: missing"):
        convert(ckpt, tmp_path / "out")
    _assert_nothing_left(tmp_path / "out")


def test_pickle_checkpoint_refused(ckpt, tmp_path):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"pytorch_model\.bin: pickle-based .* arbitrary code"):
        convert(ckpt, tmp_path / "out")


def test_truncated_weights(ckpt, tmp_path):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"model\.safetensors: truncated"):
        convert(ckpt, tmp_path / "out")
    _assert_nothing_left(tmp_path / "out")


def test_corrupt_header(ckpt, tmp_path):
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[8:20] = b"not json!!!!"
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(InputError, match="corrupt safetensors header"):
        convert(ckpt, tmp_path / "out")


def test_shape_mismatch(ckpt, tmp_path):
    def shrink(t):
        t["language_model.model.layers.2.mlp.up_proj.weight"] = ("F32", np.zeros((256, 256), np.float32))
    _rewrite_weights(ckpt, shrink)
    with pytest.raises(InputError, match=r"layers\.2\.mlp\.up_proj\.weight' has shape \[256, 256\], "
                                         r"config\.json implies \[512, 256\]"):
        convert(ckpt, tmp_path / "out")


def test_missing_vision_tensor_is_an_error(ckpt, tmp_path):
    _rewrite_weights(ckpt, lambda t: t.pop("vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight"))
    with pytest.raises(InputError, match=r"missing vision tensor 'encoder\.layers\.1\.mlp\.fc2\.weight'"):
        convert(ckpt, tmp_path / "out")


def test_whole_vision_tower_missing_is_an_error(ckpt, tmp_path):
    """llama.cpp's converter writes an mmproj without vision weights in some layouts; we refuse."""
    _rewrite_weights(ckpt, lambda t: [t.pop(k) for k in list(t) if k.startswith("vision_tower.")])
    with pytest.raises(InputError, match=r"missing vision tensor .* more\)"):
        convert(ckpt, tmp_path / "out")


def test_unexpected_tensor(ckpt, tmp_path):
    _rewrite_weights(ckpt, lambda t: t.update(
        {"language_model.model.layers.0.mlp.extra.weight": ("F32", np.ones(4, np.float32))}))
    with pytest.raises(InputError, match=r"unexpected tensor 'language_model\.model\.layers\.0\.mlp\.extra\.weight'"):
        convert(ckpt, tmp_path / "out")


def test_unsupported_architecture(ckpt, tmp_path):
    _edit_config(ckpt, lambda c: c.update(architectures=["LlamaForCausalLM"], model_type="llama"))
    with pytest.raises(UnsupportedModelError,
                       match=r"LlamaForCausalLM is not supported; medgemma converts Gemma3ForConditionalGeneration"):
        convert(ckpt, tmp_path / "out")


def test_attention_scale_llama_cpp_would_ignore(ckpt, tmp_path):
    _edit_config(ckpt, lambda c: c["text_config"].update(query_pre_attn_scalar=100))
    with pytest.raises(UnsupportedModelError, match=re.escape("query_pre_attn_scalar is 100 but llama.cpp uses 64")):
        convert(ckpt, tmp_path / "out")


def test_unknown_preset(ckpt, tmp_path):
    with pytest.raises(InputError, match="unknown preset 'Q3_XYZ'"):
        convert(ckpt, tmp_path / "out", preset="Q3_XYZ")


def test_existing_output_is_not_replaced_without_force(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "text.gguf").write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists"):
        convert(ckpt, out, preset="F16")
    assert (out / "text.gguf").read_bytes() == b"precious"
    convert(ckpt, out, preset="F16", overwrite=True)
    assert (out / "text.gguf").read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("preset", ["Q8_0", "Q4_K_M"])
def test_full_disk_mid_write_leaves_nothing(ckpt, tmp_path, monkeypatch, preset):
    """A write failing halfway (ENOSPC) is reported once, and no file appears at a final path."""
    from medgemma_cli.converters import gguf_stream

    real = gguf_stream.encode
    calls = {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(gguf_stream, "encode", failing)
    out = tmp_path / "new" / "model"
    with pytest.raises(OutputError, match="no space left on device"):
        convert(ckpt, out, preset=preset)
    assert calls["n"] == 30
    assert not (tmp_path / "new").exists()


def test_failure_after_text_file_keeps_existing_folder_clean(ckpt, tmp_path, monkeypatch):
    """The mmproj failing after text.gguf was written: neither file, nor any temporary, remains."""
    from medgemma_cli.converters import gguf_convert

    out = tmp_path / "existing"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(gguf_convert, "verify_mmproj",
                        lambda *a: (_ for _ in ()).throw(OutputError(out / "mmproj.gguf", "boom")))
    with pytest.raises(OutputError, match="boom"):
        convert(ckpt, out, preset="F16")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_header_is_validated_before_writing(ckpt):
    entries = read_header(ckpt / "model.safetensors")
    assert "language_model.model.embed_tokens.weight" in entries


def test_real_write_failure_leaves_nothing(ckpt, tmp_path):
    """The kernel refuses a write past RLIMIT_FSIZE halfway through text.gguf: a real failing write()."""
    import subprocess
    import sys

    out = tmp_path / "limited" / "model"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4_000_000, 4_000_000))\n"
        "from medgemma_cli.conversion import convert\n"
        "from medgemma_cli.errors import OutputError\n"
        "try:\n"
        f"    convert({str(ckpt)!r}, {str(out)!r}, preset='F32')\n"
        "except OutputError as e:\n"
        "    print('ERR', e)\n"
        "    sys.exit(3)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    assert "writing failed: File too large" in r.stdout
    assert not (tmp_path / "limited").exists()


def _convert_bounded(ckpt: Path, out: Path):
    """`medgemma convert` in a child limited to 2 GB of address space and 120 s, so that a config which makes
    the converter allocate for it fails this test instead of the machine."""
    import os
    import resource
    import subprocess
    import sys

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    env = {**os.environ, "MEDGEMMA_HOME": str(out.parent / "home")}
    return subprocess.run([sys.executable, "-m", "medgemma_cli", "convert", str(ckpt), "--out", str(out),
                           "--vision-onnx", "none"], capture_output=True, text=True, env=env, timeout=120,
                          preexec_fn=limit)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["text_config"].update(num_hidden_layers=10**9), r"num_hidden_layers is 1000000000"),
    (lambda c: c["text_config"].update(vocab_size=10**12), r"vocab_size 1000000000000 and hidden_size .* do not match"),
    (lambda c: c["vision_config"].update(num_hidden_layers=10**9), r"vision num_hidden_layers is 1000000000"),
])
def test_config_sizes_are_checked_against_the_weights_first(ckpt, tmp_path, edit, message):
    _edit_config(ckpt, edit)
    r = _convert_bounded(ckpt, tmp_path / "out")
    assert r.returncode == 1, r.stderr[-1000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "config.json" in lines[0]
    import re

    assert re.search(message, lines[0]), lines[0]
    _assert_nothing_left(tmp_path / "out")


def test_overlapping_tensors_are_refused(ckpt, tmp_path):
    """Two header entries pointing at the same bytes: a crafted file, refused before any read."""
    import struct

    path = ckpt / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    names = [k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32" and v["shape"] == [64]][:2]
    assert len(names) == 2
    header[names[1]]["data_offsets"] = list(header[names[0]]["data_offsets"])
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    with pytest.raises(InputError, match=r"model\.safetensors: corrupt safetensors header: tensors .* overlap"):
        read_header(path)


def test_a_shard_index_cannot_name_files_elsewhere(ckpt, tmp_path):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"language_model.model.embed_tokens.weight": "../../../../etc/passwd"}}))
    with pytest.raises(InputError, match=r"index\.json: names a shard outside the checkpoint folder"):
        convert(ckpt, tmp_path / "out")
    _assert_nothing_left(tmp_path / "out")


def test_declared_layers_must_be_the_layers_present(ckpt, tmp_path):
    _edit_config(ckpt, lambda c: c["text_config"].update(num_hidden_layers=900))
    with pytest.raises(InputError, match=r"num_hidden_layers is 900, but the weights hold 6 text layers"):
        convert(ckpt, tmp_path / "out")
