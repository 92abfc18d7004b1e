"""Where tensor data sits in the GGUF files we write. llama.cpp maps the file and reads every tensor in place,
so a tensor's file offset is its address within a page: one off a cache line splits AVX-512 loads (decode
17 % slower on an Intel Xeon, issue 17)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from medgemma_cli.kernels.ggml import read_gguf_info
from medgemma_cli.kernels.llama_quantize import llama_quantize
from medgemma_cli.kernels.policy import MMPROJ_TYPES, PRESETS

CACHE_LINE = 64  # every tensor starts on one
PAGE = 4096  # a GGUF's data section starts on one


def assert_aligned(path: Path, alignment: int | None = None) -> None:
    """Every tensor on a cache line and the data section on a page, as ggml reads the file (offsets from the
    start of the file), gguf-py's reader agreeing; `general.alignment` as given (None: GGUF's default)."""
    info = read_gguf_info(path, keys={"general.alignment"})
    offsets = {t.name: t.offset for t in info.tensors}
    off = {name: o % CACHE_LINE for name, o in offsets.items() if o % CACHE_LINE}
    assert not off, f"{len(off)} of {len(offsets)} tensors off a cache line, e.g. {next(iter(off.items()))}"
    assert min(offsets.values()) % PAGE == 0, min(offsets.values())
    assert info.get("general.alignment") == alignment
    assert {t.name: int(t.data_offset) for t in gguf.GGUFReader(path).tensors} == offsets


@pytest.mark.parametrize("preset", list(PRESETS))
def test_text_model_tensors_start_on_cache_lines(convert_tiny, preset):
    assert_aligned(convert_tiny(preset) / "text.gguf")


@pytest.mark.parametrize("mmproj", list(MMPROJ_TYPES))
def test_mmproj_tensors_start_on_cache_lines(convert_tiny, mmproj):
    assert_aligned(convert_tiny("Q8_0", mmproj) / "mmproj.gguf")


@pytest.mark.parametrize("longer_name", [0, 32])
def test_alignment_does_not_depend_on_the_header(tiny_ckpt, tmp_path, longer_name):
    """With 32-byte alignment alone the data section starts 0 or 32 bytes into a cache line, as the header's
    length (here, the model's name) falls; of two names 32 characters apart, one used to fall wrong."""
    from medgemma_cli.conversion import convert

    src = tmp_path / ("medgemma" + "-" * longer_name)
    shutil.copytree(tiny_ckpt, src)
    out = convert(src, tmp_path / "out", preset="Q8_0", vision_onnx="none").path
    assert_aligned(out / "text.gguf")
    assert_aligned(out / "mmproj.gguf")


def test_llama_quantize_keeps_our_layout(convert_tiny, tmp_path):
    """Why the files keep GGUF's default alignment key: llama.cpp's quantizer copies our header (padding
    included) and pads tensors to 32 bytes, so its output from our lossless file is aligned too; a file that
    said `general.alignment = 64` would come out of it corrupt."""
    out = tmp_path / "q8_0.gguf"
    llama_quantize(convert_tiny("F32") / "text.gguf", out, gguf.LlamaFileType.MOSTLY_Q8_0, threads=2)
    assert_aligned(out)


def _write(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from medgemma_cli.converters.gguf_stream import begin_gguf

    w = begin_gguf(path, "llama", lambda w: w.add_name("layout test"),
                   [(name, a.shape, Q.F32, a.nbytes) for name, a in arrays.items()])
    f = w.fout[0]
    for a in arrays.values():
        f.write(b"\0" * (-f.tell() % w.data_alignment))
        f.write(a.tobytes())
    f.write(b"\0" * (-f.tell() % w.data_alignment))
    w.close()


def test_tensors_of_odd_sizes_get_general_alignment(tmp_path):
    """32-byte padding cannot keep a tensor after a 32-byte one on a cache line: such files say so."""
    from medgemma_cli.converters.gguf_stream import file_alignment

    assert file_alignment([1024, 4096, 12]) == 32  # the last tensor's size does not matter
    assert file_alignment([32, 1024]) == 64
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal(8, dtype=np.float32), "b": rng.standard_normal((3, 64), dtype=np.float32),
              "c": rng.standard_normal(5, dtype=np.float32)}
    _write(tmp_path / "odd.gguf", arrays)
    assert_aligned(tmp_path / "odd.gguf", alignment=CACHE_LINE)
    back = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "odd.gguf").tensors}
    assert all(np.array_equal(back[k], v) for k, v in arrays.items())


def test_the_header_is_padded_by_less_than_a_page(tmp_path):
    from medgemma_cli.converters.gguf_stream import PADDING_KEY

    arrays = {"w": np.arange(1024, dtype=np.float32).reshape(4, 256)}
    _write(tmp_path / "a.gguf", arrays)
    assert_aligned(tmp_path / "a.gguf")
    assert 1 <= len(read_gguf_info(tmp_path / "a.gguf", keys={PADDING_KEY}).get(PADDING_KEY)) <= PAGE
    assert np.array_equal(np.asarray(gguf.GGUFReader(tmp_path / "a.gguf").tensors[0].data), arrays["w"])


def test_llama_quantize_refuses_what_it_would_corrupt(tmp_path):
    """llama.cpp's quantizer copies general.alignment but pads its output to 32 bytes: refused, not written."""
    from medgemma_cli.errors import InputError

    _write(tmp_path / "odd.gguf", {"a": np.ones(8, np.float32), "b": np.ones((2, 32), np.float32)})
    with pytest.raises(InputError, match=re.escape("general.alignment = 64")):
        llama_quantize(tmp_path / "odd.gguf", tmp_path / "out.gguf", gguf.LlamaFileType.MOSTLY_Q8_0)
    assert not (tmp_path / "out.gguf").exists()
