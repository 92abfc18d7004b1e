"""Our safetensors reader/writer against the reference implementation (the safetensors package + torch)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from medgemma_cli.converters.safetensors_io import SafetensorsFile, float32_to_bf16_bits, read_header, save, to_float32
from medgemma_cli.errors import InputError


def test_reads_what_the_reference_writer_wrote(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    ref = {"a": torch.tensor(rng.standard_normal((5, 7)), dtype=torch.bfloat16),
           "b": torch.tensor(rng.standard_normal((3,)), dtype=torch.float16),
           "c": torch.tensor(rng.standard_normal((2, 3, 4)), dtype=torch.float32)}
    save_file(ref, tmp_path / "x.safetensors")
    f = SafetensorsFile(tmp_path / "x.safetensors")
    for name, t in ref.items():
        ours = to_float32(f.read(name), f.entries[name].dtype)
        assert np.array_equal(ours, t.float().numpy()), name
    # row ranges read only what was asked for
    assert np.array_equal(to_float32(f.read("a", slice(2, 4)), "BF16"), ref["a"][2:4].float().numpy())
    f.close()


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal(10000).astype(np.float32) * 1000
    x[:4] = [0.0, -0.0, np.inf, -np.inf]
    ours = float32_to_bf16_bits(x)
    ref = torch.tensor(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, ref)


def test_roundtrip_through_the_reference_reader(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    x = np.random.default_rng(2).standard_normal((4, 6)).astype(np.float32)
    save(tmp_path / "y.safetensors", {"w": ("BF16", float32_to_bf16_bits(x)), "v": ("F32", x)})
    loaded = load_file(tmp_path / "y.safetensors")
    assert torch.equal(loaded["w"], torch.tensor(x).to(torch.bfloat16))
    assert np.array_equal(loaded["v"].numpy(), x)


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "t.safetensors"
    save(path, {"w": ("F32", np.ones((64, 64), np.float32))})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match=r"t\.safetensors: truncated: tensor 'w'"):
        read_header(path)


def _with_header(header: dict, data: bytes = b"\0" * 64) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


@pytest.mark.parametrize("blob, message", [
    (b"\x01\x02", "not a safetensors file"),
    (struct.pack("<Q", 10**12) + b"{}", "header length out of range"),
    (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
    (_with_header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}), "byte range does not match"),
    (_with_header({"w": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 4]}}), "unsupported dtype"),
    (_with_header({"w": {"dtype": "F32", "shape": [4]}}), "corrupt safetensors header entry"),
])
def test_corrupt_headers(tmp_path, blob, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(InputError, match=message):
        read_header(path)
