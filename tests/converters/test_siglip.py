"""MedSigLIP → ONNX against transformers + torch on a tiny random SiglipModel made here; tokenizer, recipe, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medgemma_cli.conversion import convert
from medgemma_cli.errors import InputError, MedgemmaError

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")

STRINGS = [
    "pleural effusion", "Pleural Effusion!", "  chest   x-ray,  showing   pneumothorax. ", "CARDIOMEGALY",
    "no acute cardiopulmonary process", "left lower-lobe consolidation (likely pneumonia)", "a photo of a ct scan",
    "Nodule: 8 mm, right upper lobe; follow-up in 3 months?", "émphysème pulmonaire", "x" * 300,
    "fracture of the 5th rib", "", "!!!", "normal", "heart size is normal; lungs are clear",
    "tube & line placement", "ÄÖÜ unicode – dash “quotes”", "metastasis " * 40, "edema\tand\neffusion", "42",
    "support devices: ET tube, NG tube",
]


@pytest.fixture(scope="module")
def converted(siglip_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("siglip-onnx")
    return {p: convert(siglip_ckpt, root / p, preset=p).path for p in ("fp32", "int8", "q4")}


def _reference(ckpt: Path, px: np.ndarray, ids: np.ndarray):
    from transformers import SiglipModel

    m = SiglipModel.from_pretrained(ckpt).eval()
    with torch.no_grad():
        out = m(pixel_values=torch.tensor(px), input_ids=torch.tensor(ids))
    return out.image_embeds.numpy(), out.text_embeds.numpy(), out.logits_per_image.numpy()


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_fp32_embeddings_and_logits_match_torch(siglip_ckpt, converted):
    from medgemma_cli.siglip import Siglip, resolve_siglip

    sig = Siglip(resolve_siglip(converted["fp32"]), threads=2)
    rng = np.random.default_rng(0)
    px = rng.uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    ids = sig.tokenizer(["pleural effusion", "pneumothorax"])
    ref_img, ref_txt, ref_logits = _reference(siglip_ckpt, px, ids)
    img = sig.vision.run(None, {"pixel_values": px})[0]
    txt = sig.text.run(None, {"input_ids": ids})[0]
    assert _cos(img, ref_img).min() >= 0.99999 and _cos(txt, ref_txt).min() >= 0.99999
    norm = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    logits = sig.logits(norm(img), norm(txt))
    assert np.abs(logits - ref_logits).max() <= 1e-3


@pytest.mark.parametrize("preset, bound", [("int8", 0.99), ("q4", 0.98)])
def test_quantized_graphs(siglip_ckpt, converted, preset, bound):
    import onnx

    from medgemma_cli.siglip import Siglip, resolve_siglip

    ops = {n.op_type for n in onnx.load(str(converted[preset] / "siglip-vision.onnx")).graph.node}
    assert ("DynamicQuantizeLinear" in ops or "MatMulInteger" in ops) if preset == "int8" else "MatMulNBits" in ops
    sig = Siglip(resolve_siglip(converted[preset]), threads=2)
    px = np.random.default_rng(1).uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)
    ref_img, _, _ = _reference(siglip_ckpt, px, sig.tokenizer(["x"]))
    cos = _cos(sig.vision.run(None, {"pixel_values": px})[0], ref_img)
    print(f"{preset} image-embedding cosine vs torch fp32: min {cos.min():.6f}")
    assert cos.min() >= bound


def test_tokenizer_matches_siglip_tokenizer(siglip_ckpt):
    from transformers import SiglipTokenizer

    from medgemma_cli.siglip import SiglipTextTokenizer

    ref = SiglipTokenizer(vocab_file=str(siglip_ckpt / "spiece.model"))
    ours = SiglipTextTokenizer(siglip_ckpt / "spiece.model", 64)
    for s in STRINGS:
        want = ref(s, padding="max_length", max_length=64, truncation=True)["input_ids"]
        assert ours([s])[0].tolist() == want, s


def test_preprocessing_recipe_against_torch_interpolate():
    import torch.nn.functional as F

    from medgemma_cli.siglip import preprocess

    rng = np.random.default_rng(2)
    grey16 = rng.integers(0, 65535, (40, 24), dtype=np.uint16)
    got = preprocess(grey16, 32, [0.5] * 3, [0.5] * 3)
    x = grey16.astype(np.float64) / 65535
    sq = np.zeros((40, 40))
    sq[:, 8:32] = x  # centred zero padding
    t = torch.tensor(sq)[None, None]
    ref = F.interpolate(t, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)[0, 0].numpy()
    ref = (ref - 0.5) / 0.5
    assert got.shape == (3, 32, 32) and np.abs(got - ref[None]).max() < 1e-5
    rgba = rng.integers(0, 255, (32, 32, 4), dtype=np.uint8)
    assert np.allclose(preprocess(rgba, 32, [0.5] * 3, [0.5] * 3), (rgba[..., :3].transpose(2, 0, 1) / 255 - 0.5) / 0.5,
                       atol=1e-6)


def test_external_data_for_large_graphs(siglip_ckpt, tmp_path, monkeypatch):
    import uuid

    from medgemma_cli.converters import siglip_convert
    from medgemma_cli.siglip import Siglip, resolve_siglip

    def no_mac_lookups(*args, **kwargs):
        raise AssertionError("uuid.uuid1 asks uuidd over a socket and reads the MAC address")

    monkeypatch.setattr(siglip_convert, "_EXTERNAL_OVER", 0)
    monkeypatch.setattr(uuid, "uuid1", no_mac_lookups)
    out = convert(siglip_ckpt, tmp_path / "ext", preset="fp32").path
    assert (out / "siglip-vision.onnx.data").is_file() and (out / "siglip-text.onnx.data").is_file()
    q = convert(siglip_ckpt, tmp_path / "ext-int8", preset="int8").path  # ONNX Runtime's quantizer saves too
    assert (q / "siglip-vision.onnx.data").is_file()
    assert not [p for p in out.iterdir() if ".partial" in p.name or ".scratch" in p.name]
    sig = Siglip(resolve_siglip(out), threads=1)
    assert sig.embed_texts(["ok"]).shape == (1, 64)


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDGEMMA_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "medgemma_cli", *args], capture_output=True, text=True, env=env,
                          cwd=home, timeout=300)


def test_classify_and_embed_end_to_end(converted, tmp_path):
    from PIL import Image
    from pydicom.data import get_testdata_file

    png = tmp_path / "cxr.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 30), dtype=np.uint8)).save(png)
    dcm = get_testdata_file("CT_small.dcm", download=False)
    r = _cli("classify", str(png), dcm, "--labels", "pleural effusion", "--labels", "pneumothorax",
             "--model", str(converted["int8"]), "--template", "chest x-ray showing {}", "--json", home=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert [Path(x["path"]).name for x in res] == ["cxr.png", "CT_small.dcm"]
    for x in res:
        probs = list(x["scores"].values())
        assert set(x["scores"]) == {"pleural effusion", "pneumothorax"} and probs == sorted(probs, reverse=True)
        assert all(0 < p < 1 for p in probs)
    soft = _cli("classify", str(png), "-l", "a", "-l", "b", "--softmax", "--json", "--model", str(converted["fp32"]),
                home=tmp_path)
    assert abs(sum(json.loads(soft.stdout)[0]["scores"].values()) - 1) < 1e-5

    out = tmp_path / "emb.npz"
    r = _cli("embed", str(png), dcm, "--out", str(out), "--model", str(converted["fp32"]), home=tmp_path)
    assert r.returncode == 0, r.stderr
    z = np.load(out)
    assert z["embeddings"].shape == (2, 64) and np.allclose(np.linalg.norm(z["embeddings"], axis=1), 1, atol=1e-5)
    assert [Path(s).name for s in z["sources"]] == ["cxr.png", "CT_small.dcm"]
    csv = tmp_path / "labels.csv"
    r = _cli("embed", "--text", "effusion", "--text", "normal", "--out", str(csv), "--model", str(converted["fp32"]),
             home=tmp_path)
    assert r.returncode == 0, r.stderr
    import pandas as pd

    df = pd.read_csv(csv)
    assert list(df["source"]) == ["effusion", "normal"] and df.shape[1] == 2 + 64


def test_errors(converted, convert_tiny, tmp_path):
    from medgemma_cli.siglip import classify, embed

    with pytest.raises(InputError, match="not MedSigLIP"):
        classify([tmp_path], ["x"], model=convert_tiny("Q8_0"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnope")
    with pytest.raises(InputError, match=r"bad\.png: not a readable image"):
        classify([bad], ["x"], model=converted["fp32"])
    with pytest.raises(MedgemmaError, match="at least one label"):
        classify([bad], ["  "], model=converted["fp32"])
    with pytest.raises(InputError, match=r"\.npz"):
        embed([bad], tmp_path / "out.txt", model=converted["fp32"])
    r = _cli("classify", str(tmp_path / "missing.png"), "-l", "x", "--model", str(converted["fp32"]), home=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "missing.png" in r.stderr
