"""Hugging Face SigLIP (MedSigLIP) checkpoint → siglip-vision.onnx + siglip-text.onnx + tokenizer + manifest.

Separate graphs so images are embedded once and label texts once. Built from the numpy weights with our
graph builder; no torch, no optimum.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from medgemma_cli import __version__
from medgemma_cli.atomic import AtomicFolder, write_errors
from medgemma_cli.checksums import sha256_file
from medgemma_cli.converters.checkpoint import Checkpoint
from medgemma_cli.converters.onnx_graph import (
    ONNX_DATA_ALIGNMENT,
    GraphBuilder,
    siglip_pooling_head,
    siglip_text_tower,
    siglip_vision_tower,
)
from medgemma_cli.errors import InputError, OutputError
from medgemma_cli.kernels.onnx_quant import ONNX_PRESETS, quantize_onnx
from medgemma_cli.offline import no_uuid1
from medgemma_cli.progress import NullProgress, Progress

VISION_FILE, TEXT_FILE = "siglip-vision.onnx", "siglip-text.onnx"
TOKENIZER_FILE, MANIFEST_FILE = "tokenizer.model", "manifest.json"
_EXTERNAL_OVER = 1_500_000_000  # protobuf stops at 2 GB; larger graphs keep their weights beside them


def is_siglip(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "siglip" or "SiglipModel" in (config.get("architectures") or [])


def _prefix_map(ckpt: Checkpoint) -> str:
    """'' or 'model.' — where SiglipModel's vision_model/text_model keys start."""
    for pre in ("", "model."):
        if f"{pre}vision_model.embeddings.patch_embedding.weight" in ckpt.entries:
            return pre
    raise InputError(ckpt.folder, "no SigLIP vision weights (vision_model.embeddings.patch_embedding.weight) found")


def _save(model: onnx.ModelProto, path: Path) -> bool:
    big = model.ByteSize() > _EXTERNAL_OVER if model.ByteSize() >= 0 else True
    if big:
        with no_uuid1():
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return big


def _external_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of a graph whose data lives in a file: initializers, and constants in node attributes
    (ONNX Runtime's quantizer externalizes those too), subgraphs included."""
    for t in graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t
    for node in graph.node:
        for a in node.attribute:
            for t in ([a.t] if a.HasField("t") else []) + list(a.tensors):
                if t.data_location == onnx.TensorProto.EXTERNAL:
                    yield t
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _external_tensors(g)


def _realign_external_data(graph: Path, data_tmp: Path, final_name: str) -> None:
    """Move a graph's external weights to the file that will be renamed to `final_name`, each at a multiple of
    ONNX_DATA_ALIGNMENT, and point the graph at that final name (the graph and its data become final together).

    onnx's and ONNX Runtime's savers write the weights back to back: the file is renamed when that left them
    aligned (MedSigLIP's sizes do), and copied with padding when it did not."""
    m = onnx.load(str(graph), load_external_data=False)
    entries = [{e.key: e for e in t.external_data} for t in _external_tensors(m.graph)]
    if not entries:
        return
    locations = {e["location"].value for e in entries}
    if len(locations) != 1 or any("offset" not in e or "length" not in e for e in entries):
        raise OutputError(graph, f"expected one external data file with offsets and lengths, found {sorted(locations)}")
    src = graph.parent / locations.pop()
    if all(int(e["offset"].value) % ONNX_DATA_ALIGNMENT == 0 for e in entries):
        src.rename(data_tmp)
    else:
        with open(src, "rb") as fin, open(data_tmp, "wb") as fout:
            for e in sorted(entries, key=lambda e: int(e["offset"].value)):
                fout.write(b"\0" * (-fout.tell() % ONNX_DATA_ALIGNMENT))
                offset, left = fout.tell(), int(e["length"].value)
                fin.seek(int(e["offset"].value))
                while left:
                    chunk = fin.read(min(left, 16 << 20))
                    if not chunk:
                        raise OutputError(src, "external data ends before its last tensor")
                    fout.write(chunk)
                    left -= len(chunk)
                e["offset"].value = str(offset)
        src.unlink()
    for e in entries:
        e["location"].value = final_name
    onnx.save_model(m, str(graph))


def convert_siglip(src: Path | str, out: Path | str, preset: str = "int8", text_preset: str = "fp32", *,
                   overwrite: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or NullProgress()
    src, out = Path(src), Path(out)
    for p in (preset, text_preset):
        if p not in ONNX_PRESETS:
            raise InputError(None, f"unknown ONNX preset {p!r}; choose one of {', '.join(ONNX_PRESETS)}")
    with Checkpoint(src) as ckpt:
        cfg = ckpt.config
        if not is_siglip(cfg):
            raise InputError(ckpt.config_path, "not a SigLIP checkpoint")
        vc, tc = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
        vc = {"hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12, "patch_size": 16,
              "image_size": 224, "layer_norm_eps": 1e-6, **vc}
        tc = {"hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12, "max_position_embeddings": 64,
              "layer_norm_eps": 1e-6, **tc}
        tok = next((src / n for n in ("spiece.model", "tokenizer.model") if (src / n).is_file()), None)
        if tok is None:
            raise InputError(src / "spiece.model", "missing (SigLIP's SentencePiece tokenizer)")
        pre = _prefix_map(ckpt)
        used: set[str] = set()

        def get(name: str) -> np.ndarray:
            key = pre + name
            if key not in ckpt.entries:
                raise InputError(ckpt.folder, f"missing tensor {key!r}")
            used.add(key)
            return ckpt.read_f32(key)

        progress.begin("Building ONNX graphs", 2, 0)
        vis = GraphBuilder("siglip_vision")
        hidden = siglip_vision_tower(vis, get, "vision_model", vc)
        vis.output(siglip_pooling_head(vis, hidden, get, "vision_model.head", vc), "image_embeds",
                   ["batch", vc["hidden_size"]])
        txt = GraphBuilder("siglip_text")
        txt.output(siglip_text_tower(txt, get, "text_model", tc), "text_embeds",
                   ["batch", tc.get("projection_size", tc["hidden_size"])])
        scale = float(get("logit_scale").reshape(-1)[0])
        bias = float(get("logit_bias").reshape(-1)[0])
        unused = sorted(set(ckpt.entries) - used)
        if unused:
            raise InputError(ckpt.entries[unused[0]].path, f"unexpected tensor {unused[0]!r}" +
                             (f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""))
        pre_cfg = ckpt.processor_config
        files = [VISION_FILE, TEXT_FILE, TOKENIZER_FILE, MANIFEST_FILE]
        with AtomicFolder(out, [*files, VISION_FILE + ".data", TEXT_FILE + ".data"], overwrite=overwrite) as folder, \
                write_errors(out):
            try:
                entries = {}
                for graph, final, qp in ((vis, VISION_FILE, preset), (txt, TEXT_FILE, text_preset)):
                    progress.status(f"writing {final} ({qp})")
                    tmp = folder.temp(final)
                    model = graph.model()
                    if qp == "fp32":
                        ext = _save(model, tmp)
                    else:
                        fp32 = folder.scratch(final + ".fp32.onnx")
                        ext = _save(model, fp32)
                        del model
                        with no_uuid1():
                            quantize_onnx(fp32, tmp, qp, external_data=ext)
                    onnx.checker.check_model(str(tmp))
                    if ext:
                        _realign_external_data(tmp, folder.temp(final + ".data"), final + ".data")
                    entries[final] = {"size": tmp.stat().st_size, "sha256": sha256_file(tmp), "preset": qp}
                    progress.advance(1, tensors=0)
                shutil.copyfile(tok, folder.temp(TOKENIZER_FILE))
                entries[TOKENIZER_FILE] = {"size": tok.stat().st_size, "sha256": sha256_file(tok)}
                manifest = {
                    "format": "medgemma-cli.model/1", "tool": {"name": "medgemma-cli", "version": __version__},
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "kind": "onnx-siglip",
                    "source": {"path": str(ckpt.folder.resolve()), "architecture": "SiglipModel",
                               "config_sha256": ckpt.config_sha256},
                    "preset": preset, "text_preset": text_preset,
                    "logit_scale": scale, "logit_bias": bias,
                    "image_size": int(vc["image_size"]), "max_length": int(tc["max_position_embeddings"]),
                    "image_mean": pre_cfg.get("image_mean", [0.5, 0.5, 0.5]),
                    "image_std": pre_cfg.get("image_std", [0.5, 0.5, 0.5]),
                    "embedding_size": int(vc["hidden_size"]),
                    "files": entries,
                }
                folder.temp(MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            finally:
                progress.end()
    return manifest
