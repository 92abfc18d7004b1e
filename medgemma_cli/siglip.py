"""MedSigLIP on ONNX Runtime: zero-shot labels (`classify`) and embeddings (`embed`).

The tokenizer is SiglipTokenizer's behaviour rebuilt on sentencepiece (lower-case, punctuation removed,
EOS appended, padded to 64 with `</s>`, no attention mask); images follow MedSigLIP's own recipe
(dtype-max scaling, grey → 3 channels, alpha dropped, zero-pad to a square, bilinear resize without
antialiasing, mean = std = 0.5). DICOM goes through the same rendering as `ask`.
"""

from __future__ import annotations

import json
import os
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_cli import stopping
from medgemma_cli.atomic import replacing
from medgemma_cli.containment import stage
from medgemma_cli.errors import InputError, MedgemmaError
from medgemma_cli.inputs import dicom
from medgemma_cli.inputs.collect import expand
from medgemma_cli.inputs.images import is_image

_PUNCT = str.maketrans("", "", string.punctuation)


class SiglipTextTokenizer:
    def __init__(self, model_file: Path, max_length: int = 64):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.max_length = max_length
        self.eos = self.sp.PieceToId("</s>")
        self.pad = self.eos

    @staticmethod
    def canonicalize(text: str) -> str:
        return re.sub(r"\s+", " ", text.lower().translate(_PUNCT)).strip()

    def __call__(self, texts: list[str]) -> np.ndarray:
        rows = []
        for t in texts:
            ids = [*self.sp.encode(self.canonicalize(t))[: self.max_length - 1], self.eos]
            rows.append(ids + [self.pad] * (self.max_length - len(ids)))
        return np.array(rows, dtype=np.int64)


def resize_bilinear(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of an H×W×C array, half-pixel centres, no antialiasing (MedSigLIP's recipe)."""
    h, w = x.shape[:2]

    def axis(n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = np.clip((np.arange(size) + 0.5) * (n_in / size) - 0.5, 0, n_in - 1)
        lo = np.floor(c).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), c - lo

    y0, y1, fy = axis(h)
    x0, x1, fx = axis(w)
    top = x[y0][:, x0] * (1 - fx)[None, :, None] + x[y0][:, x1] * fx[None, :, None]
    bottom = x[y1][:, x0] * (1 - fx)[None, :, None] + x[y1][:, x1] * fx[None, :, None]
    return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def preprocess(arr: np.ndarray, size: int, mean: list[float], std: list[float]) -> np.ndarray:
    """An image array (any integer dtype, grey/RGB/RGBA) → [3, size, size] float32, MedSigLIP's recipe."""
    x = arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.integer):
        x /= float(np.iinfo(arr.dtype).max)
    if x.ndim == 2:
        x = np.repeat(x[..., None], 3, axis=-1)
    elif x.shape[-1] == 4:
        x = x[..., :3]
    elif x.shape[-1] == 2:  # grey + alpha
        x = np.repeat(x[..., :1], 3, axis=-1)
    h, w = x.shape[:2]
    side = max(h, w)
    padded = np.zeros((side, side, 3), dtype=np.float64)
    top, left = (side - h) // 2, (side - w) // 2
    padded[top:top + h, left:left + w] = x
    x = resize_bilinear(padded, size)
    x = (x - np.array(mean)) / np.array(std)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def load_image_array(path: Path) -> list[np.ndarray]:
    """Pixel arrays to embed from one file: the image itself, or each DICOM image/slice as `ask` renders it."""
    if dicom.is_dicom(path):
        ds = dicom.read(path)
        if "PixelData" not in ds:
            raise InputError(path, "this DICOM object has no image")
        (vol,) = dicom.assemble([(path, ds)], max_slices=dicom.MAX_SLICES)
        return dicom.render_volume(vol)
    if not is_image(path):
        raise InputError(path, "not a DICOM file or PNG/JPEG image")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return [np.asarray(im)]
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(path, f"not a readable image ({e})") from e


@dataclass(frozen=True)
class SiglipModelFiles:
    folder: Path
    manifest: dict[str, Any]


def resolve_siglip(model: Path | None) -> SiglipModelFiles:
    from medgemma_cli import store

    if model is None:
        model = store.newest("onnx-siglip", "MedSigLIP")
    folder = Path(model)
    if not (folder / "manifest.json").is_file() and (store.models_dir() / str(model) / "manifest.json").is_file():
        folder = store.models_dir() / str(model)
    if not folder.is_dir():
        raise InputError(folder, "not a converted model folder")
    return SiglipModelFiles(folder, store.verified_manifest(folder, "onnx-siglip", "MedSigLIP (convert a SigLIP "
                                                                                    "checkpoint)"))


class Siglip:
    """The two ONNX Runtime sessions of a converted MedSigLIP, with thread control."""

    def __init__(self, files: SiglipModelFiles, threads: int | None = None):
        import onnxruntime as ort

        self.files = files
        m = files.manifest
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or os.cpu_count() or 1)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3

        def session(name: str, preset: str) -> Any:
            providers = ["CPUExecutionProvider"]
            if (sys.platform == "darwin" and preset == "fp32"
                    and "CoreMLExecutionProvider" in ort.get_available_providers()):
                providers.insert(0, "CoreMLExecutionProvider")  # standard ops only: fp32 graphs
            return ort.InferenceSession(str(files.folder / name), opts, providers=providers)

        with stage("ONNX Runtime", "loading MedSigLIP"):
            self.vision = session("siglip-vision.onnx", m["preset"])
            self.text = session("siglip-text.onnx", m.get("text_preset", "fp32"))
        self.tokenizer = SiglipTextTokenizer(files.folder / "tokenizer.model", m["max_length"])
        self.size, self.mean, self.std = m["image_size"], m["image_mean"], m["image_std"]
        self.scale, self.bias = float(np.exp(m["logit_scale"])), float(m["logit_bias"])

    def embed_images(self, arrays: list[np.ndarray], batch: int = 8) -> np.ndarray:
        out = []
        for i in range(0, len(arrays), batch):
            px = np.stack([preprocess(a, self.size, self.mean, self.std) for a in arrays[i:i + batch]])
            with stage("ONNX Runtime", "encoding images with MedSigLIP"):
                out.append(stopping.run_onnx(self.vision, {"pixel_values": px})[0])
        return _l2(np.concatenate(out)) if out else np.zeros((0, self.files.manifest["embedding_size"]), np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        ids = self.tokenizer(texts)
        with stage("ONNX Runtime", "encoding labels with MedSigLIP"):
            return _l2(stopping.run_onnx(self.text, {"input_ids": ids})[0])

    def logits(self, images: np.ndarray, texts: np.ndarray) -> np.ndarray:
        return images @ texts.T * self.scale + self.bias


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class Classification:
    path: str
    frame: int | None
    scores: dict[str, float]  # label → probability, sorted high to low


def _gather(paths: list[Path]) -> list[tuple[Path, int | None, np.ndarray]]:
    files, _ = expand([Path(p) for p in paths])
    named = {Path(p) for p in paths}
    items = []
    for f in files:
        if f not in named and not (dicom.is_dicom(f) or is_image(f)):
            continue  # folders may hold other files
        arrays = load_image_array(f)
        for i, a in enumerate(arrays):
            items.append((f, i if len(arrays) > 1 else None, a))
    if not items:
        raise MedgemmaError("no images found in the given files")
    return items


def _checked_labels(labels: list[str], template: str | None) -> list[str]:
    out = [lb.strip() for lb in labels if lb.strip()]
    if not out:
        raise MedgemmaError("give at least one label (--labels \"pleural effusion\" \"pneumothorax\" …)")
    if template is not None and "{}" not in template:
        raise MedgemmaError("the template must contain {} where the label goes, e.g. \"chest x-ray showing {}\"")
    return out


class ZeroShot:
    """Label probabilities for arrays already in memory; the label texts are embedded once.

    sigmoid(cos · exp(scale) + bias) per label by default (MedSigLIP's training objective), softmax over
    the labels on request."""

    def __init__(self, labels: list[str], *, model: Path | None = None, template: str | None = None,
                 softmax: bool = False, threads: int | None = None):
        self.labels = _checked_labels(labels, template)
        self.files = resolve_siglip(model)
        self.template, self.softmax = template, softmax
        self.model = Siglip(self.files, threads)
        self.texts = self.model.embed_texts([template.format(lb) if template else lb for lb in self.labels])

    def identity(self) -> str:
        """What the probabilities depend on: the model's files, the labels, the template, the activation."""
        import hashlib

        key = json.dumps([self.files.manifest.get("files"), self.labels, self.template, self.softmax], sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def probabilities(self, arrays: list[np.ndarray]) -> np.ndarray:
        z = self.model.logits(self.model.embed_images(arrays), self.texts)
        if self.softmax:
            e = np.exp(z - z.max(axis=1, keepdims=True))
            return e / e.sum(axis=1, keepdims=True)
        return 1.0 / (1.0 + np.exp(-z))


def classify(paths: list[Path], labels: list[str], *, model: Path | None = None, template: str | None = None,
             softmax: bool = False, threads: int | None = None) -> list[Classification]:
    """Per-label probabilities for every image (every frame of a multi-frame DICOM), highest first."""
    _checked_labels(labels, template)
    resolve_siglip(model)
    items = _gather(paths)  # cheap checks first: a wrong path is reported before the model is loaded
    zero_shot = ZeroShot(labels, model=model, template=template, softmax=softmax, threads=threads)
    p = zero_shot.probabilities([a for _, _, a in items])
    out = []
    for (path, frame, _), row in zip(items, p, strict=True):
        order = np.argsort(-row)
        out.append(Classification(str(path), frame, {zero_shot.labels[j]: float(row[j]) for j in order}))
    return out


def embed(paths: list[Path], out: Path, *, model: Path | None = None, text: list[str] | None = None,
          threads: int | None = None) -> dict[str, Any]:
    """L2-normalised embeddings written to .npz (numpy) or .csv (pandas), with their sources."""
    suffix = out.suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise InputError(out, "use a .npz (numpy) or .csv (pandas) output file")
    files = resolve_siglip(model)
    if not text:
        items = _gather(paths)
    sig = Siglip(files, threads)
    frames: list[int | None]
    if text:
        vectors, sources, frames = sig.embed_texts(text), list(text), [None] * len(text)
    else:
        vectors = sig.embed_images([a for _, _, a in items])
        sources, frames = [str(p) for p, _, _ in items], [f for _, f, _ in items]
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:
        if suffix == ".npz":
            with open(tmp, "wb") as fb:
                np.savez(fb, embeddings=vectors, sources=np.array(sources),
                         frames=np.array([-1 if fr is None else fr for fr in frames]))
        else:
            import csv

            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["source", "frame"] + [f"e{i}" for i in range(vectors.shape[1])])
                for s, fr, v in zip(sources, frames, vectors, strict=True):
                    w.writerow([s, "" if fr is None else fr] + [f"{x:.7g}" for x in v])
    return {"path": str(out), "count": len(sources), "dimensions": int(vectors.shape[1]),
            "kind": "text" if text else "image"}
