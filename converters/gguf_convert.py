"""Hugging Face MedGemma checkpoint → text.gguf (+ mmproj.gguf) + manifest.json."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from medgemma_cli import __version__
from medgemma_cli.atomic import AtomicFolder, write_errors
from medgemma_cli.checksums import sha256_file
from medgemma_cli.converters import gemma3
from medgemma_cli.converters.checkpoint import Checkpoint
from medgemma_cli.converters.gguf_stream import (
    TENSOR_ALIGNMENT,
    PlannedTensor,
    QuantError,
    misaligned_tensors,
    write_gguf,
)
from medgemma_cli.converters.tokenizer import TokenType, Vocabulary, read_vocabulary, write_vocabulary
from medgemma_cli.converters.vision_onnx import ATTENTION_BLOCK, VISION_ONNX_PRESETS, write_vision_onnx
from medgemma_cli.errors import InputError, OutputError
from medgemma_cli.kernels.ggml import GGUFInfo, read_gguf_info
from medgemma_cli.kernels.imatrix import read_imatrix
from medgemma_cli.kernels.policy import (
    DEFAULT_MMPROJ_TYPE,
    DEFAULT_PRESET,
    MMPROJ_FILE_TYPES,
    MMPROJ_TYPES,
    PRESETS,
    Preset,
    fit,
    mmproj_tensor_type,
    text_tensor_type,
)
from medgemma_cli.progress import NullProgress, Progress

TEXT_FILE = "text.gguf"
MMPROJ_FILE = "mmproj.gguf"
MANIFEST_FILE = "manifest.json"
VISION_ONNX_FILE = "vision.onnx"
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


@dataclass
class ConversionPlan:
    spec: gemma3.Gemma3Spec
    text: list[PlannedTensor]
    vision: list[PlannedTensor]


def plan_tensors(ckpt: Checkpoint, spec: gemma3.Gemma3Spec, preset: Preset, mmproj_type: Q,
                 imatrix: dict[str, np.ndarray] | None = None) -> ConversionPlan:
    """Map every checkpoint tensor to its GGUF name and type; refuse missing, unexpected or misshapen ones."""
    dims = spec.dims
    expected: dict[tuple[str, str], tuple[str, tuple[str, ...], bool]] = {}
    for src, dst, syms, plus_one in gemma3.expand(gemma3.TEXT_TENSORS, spec.text.layers):
        expected[("text", src)] = (dst, syms, plus_one)
    if not spec.text.tie_embeddings:
        expected[("lm_head", "weight")] = ("output.weight", ("vocab", "hidden"), False)
    if spec.vision is not None:
        for src, dst, syms, plus_one in gemma3.expand(gemma3.VISION_TENSORS, spec.vision.layers):
            expected[("vision", src)] = (dst, syms, plus_one)
        for src, dst, syms, plus_one in gemma3.PROJECTOR_TENSORS:
            expected[("projector", src)] = (dst, syms, plus_one)

    found: dict[tuple[str, str], str] = {}
    for key, entry in ckpt.entries.items():
        parts = gemma3.split_key(key, spec.architecture)
        if parts is None:
            raise InputError(entry.path, f"unexpected tensor {key!r}: not part of a {spec.architecture} checkpoint")
        component, name = parts
        if component == "lm_head" and spec.text.tie_embeddings:
            continue  # tied to the embeddings; llama.cpp reuses token_embd
        if component == "vision" and spec.vision is not None and spec.vision.use_head and name.startswith("head."):
            continue  # SigLIP's pooling head is not used by Gemma 3
        if (component, name) not in expected:
            raise InputError(entry.path, f"unexpected tensor {key!r}")
        if (component, name) in found:
            raise InputError(entry.path, f"tensor {key!r} duplicates {found[(component, name)]!r} (two key layouts)")
        gguf_name, shape_syms, _ = expected[(component, name)]
        want = tuple(dims[s] if isinstance(s, str) else s for s in shape_syms)
        if entry.shape != want:
            raise InputError(entry.path,
                             f"tensor {key!r} has shape {list(entry.shape)}, config.json implies {list(want)}")
        if entry.dtype not in _FLOAT_DTYPES:
            raise InputError(entry.path, f"tensor {key!r} has dtype {entry.dtype}, expected a floating-point type")
        found[(component, name)] = key
    missing = [k for k in expected if k not in found]
    if missing:
        comp, name = missing[0]
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise InputError(ckpt.folder, f"missing {comp} tensor {name!r}{more}")

    text, vision = [], []
    for (component, name), (gguf_name, _, plus_one) in expected.items():
        key = found[(component, name)]
        shape = ckpt.entries[key].shape
        if component in ("text", "lm_head"):
            layer = int(gguf_name.split(".")[1]) if gguf_name.startswith("blk.") else None
            qtype = text_tensor_type(preset, gguf_name, shape, layer, spec.text.layers)
            im = _imatrix_for(imatrix, gguf_name, shape, qtype)
            text.append(PlannedTensor(gguf_name, key, shape, qtype, plus_one, im))
        else:
            vision.append(PlannedTensor(gguf_name, key, shape, mmproj_tensor_type(mmproj_type, gguf_name, shape),
                                        plus_one))
    return ConversionPlan(spec, text, vision)


def _imatrix_for(imatrix: dict[str, np.ndarray] | None, name: str, shape: tuple[int, ...],
                 qtype: Q) -> np.ndarray | None:
    """The importance vector for a tensor, used as llama-quantize uses it (only when it fits the rows)."""
    if imatrix is None or name not in imatrix or qtype in (Q.F32, Q.F16, Q.BF16):
        return None
    values = imatrix[name]
    return values if values.size == shape[-1] else None


def _model_name(ckpt: Checkpoint) -> str:
    return str(ckpt.config.get("_name_or_path") or ckpt.folder.resolve().name)


def verify_text(path: Path, r: GGUFInfo, plan: ConversionPlan, vocab: Vocabulary,
                expect_types: set[Q] | None) -> None:
    """Check the file as read back: what llama.cpp silently gets wrong when it is missing or off."""
    t = plan.spec.text
    checks = {
        "general.architecture": "gemma3",
        "tokenizer.ggml.bos_token_id": vocab.bos_id,
        "tokenizer.ggml.eos_token_id": vocab.eos_id,
        "tokenizer.ggml.padding_token_id": vocab.pad_id,
        "tokenizer.ggml.unknown_token_id": vocab.unk_id,
        "gemma3.attention.sliding_window": t.sliding_window,
        "gemma3.block_count": t.layers,
        "gemma3.rope.freq_base": t.rope_theta,
        "gemma3.rope.freq_base_swa": t.rope_theta_local,
    }
    if t.rope_scaling == "linear":
        checks["gemma3.rope.scaling.type"] = "linear"
        checks["gemma3.rope.scaling.factor"] = t.rope_factor
    _compare(path, r, checks)
    types = r.get("tokenizer.ggml.token_type")
    for tid in vocab.special_ids:
        if types[tid] != TokenType.CONTROL:
            raise OutputError(path, f"special token {tid} was not written as CONTROL")
    names = {tensor.name for tensor in r.tensors}
    want = {p.gguf_name for p in plan.text}
    if names != want:
        raise OutputError(path, f"tensor set differs from the plan: {sorted(names ^ want)[:3]}")
    if expect_types is not None:
        got = {Q(tensor.type) for tensor in r.tensors if len(tensor.ne) > 1}
        if not got & expect_types:
            raise OutputError(path, f"no tensor has the preset's types {sorted(q.name for q in expect_types)}")


def verify_mmproj(path: Path, r: GGUFInfo, plan: ConversionPlan) -> None:
    v = plan.spec.vision
    assert v is not None
    _compare(path, r, {
        "general.architecture": "clip",
        "clip.projector_type": "gemma3",
        "clip.has_vision_encoder": True,
        "clip.vision.image_size": v.image_size,
        "clip.vision.patch_size": v.patch_size,
        "clip.vision.block_count": v.layers,
        "clip.vision.projection_dim": plan.spec.text.hidden,
    })
    names = {tensor.name for tensor in r.tensors}
    want = {p.gguf_name for p in plan.vision}
    if names != want:
        raise OutputError(path, f"tensor set differs from the plan: {sorted(names ^ want)[:3]}")


def verify_layout(path: Path, r: GGUFInfo) -> None:
    """Every tensor on a cache line, as llama.cpp will map it: one that is not slows every matmul that reads it."""
    bad = misaligned_tensors(r)
    if bad:
        raise OutputError(path, f"tensor {bad[0]!r} does not start on a {TENSOR_ALIGNMENT}-byte boundary")


def _compare(path: Path, r: GGUFInfo, checks: dict[str, Any]) -> None:
    for key, want in checks.items():
        got = r.get(key)
        if isinstance(want, float) and isinstance(got, float):
            ok = abs(got - want) <= 1e-6 * max(1.0, abs(want))
        else:
            ok = got == want
        if not ok:
            raise OutputError(path, f"read back {key} = {got!r}, expected {want!r}")


def _file_entry(path: Path, r: GGUFInfo, sha256: str) -> dict[str, Any]:
    types = Counter(Q(t.type).name for t in r.tensors)
    return {"size": path.stat().st_size, "sha256": sha256, "tensors": len(r.tensors),
            "tensor_types": dict(sorted(types.items()))}


def quantization_report(plan: ConversionPlan, errors: dict[str, QuantError]) -> dict[str, Any]:
    """Relative RMS error of the dequantized weights against the source, per tensor and per tensor class."""
    classes: dict[str, dict[str, Any]] = {}
    tensors = {}
    for t in plan.text:
        e = errors[t.gguf_name]
        tensors[t.gguf_name] = {"type": t.qtype.name, "rel_rms": round(e.rel_rms, 6)}
        cls = t.gguf_name.split(".")[-2] if t.gguf_name.startswith("blk.") else t.gguf_name.rsplit(".", 1)[0]
        c = classes.setdefault(cls, {"types": Counter(), "ref": 0.0, "err": 0.0})
        c["types"][t.qtype.name] += 1
        c["ref"] += e.ref
        c["err"] += e.err
    summary = {cls: {"types": dict(c["types"]),
                     "rel_rms": round(float(np.sqrt(c["err"] / c["ref"])) if c["ref"] else 0.0, 6)}
               for cls, c in classes.items()}
    return {"classes": summary, "tensors": tensors}


def convert_gguf(src: Path | str, out: Path | str, preset: str = DEFAULT_PRESET, mmproj_type: str = DEFAULT_MMPROJ_TYPE,
                 *, overwrite: bool = False, threads: int | None = None, imatrix: Path | str | None = None,
                 vision_onnx: str = "int8", progress: Progress | None = None) -> dict[str, Any]:
    """Convert a MedGemma checkpoint folder in one pass; returns the manifest that is also written to `out`.

    Every tensor is read, converted to float32 and written straight in its final type (block types through
    ggml's own quantizers), so there is no intermediate file and memory stays at a few row chunks.
    """
    progress = progress or NullProgress()
    src, out = Path(src), Path(out)
    if preset not in PRESETS:
        raise InputError(None, f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if mmproj_type not in MMPROJ_TYPES:
        raise InputError(None, f"unknown mmproj type {mmproj_type!r}; choose one of {', '.join(MMPROJ_TYPES)}")
    pre = PRESETS[preset]
    if vision_onnx not in VISION_ONNX_PRESETS:
        raise InputError(None, f"unknown vision ONNX preset {vision_onnx!r}; "
                               f"choose one of {', '.join(VISION_ONNX_PRESETS)}")
    importance = read_imatrix(imatrix) if imatrix is not None else None
    with Checkpoint(src) as ckpt:
        spec = gemma3.read_spec(ckpt.config, ckpt.processor_config, ckpt.config_path)
        gemma3.check_against_weights(spec, {name: e.shape for name, e in ckpt.entries.items()}, ckpt.config_path)
        vocab = read_vocabulary(src, spec.text.vocab)
        plan = plan_tensors(ckpt, spec, pre, MMPROJ_TYPES[mmproj_type], importance)
        if importance is not None and not any(t.imatrix is not None for t in plan.text):
            raise InputError(imatrix, "no entry of this importance matrix matches a tensor of this model")
        name = _model_name(ckpt)
        onnx_vision = spec.vision is not None and vision_onnx != "none"
        files = [TEXT_FILE] + ([MMPROJ_FILE] if spec.vision else []) + \
            ([VISION_ONNX_FILE, VISION_ONNX_FILE + ".data"] if onnx_vision else []) + [MANIFEST_FILE]
        total = sum(t.nbytes for t in plan.text + plan.vision)
        with AtomicFolder(out, files, overwrite=overwrite) as folder, write_errors(out):
            try:
                extra = {}
                if importance is not None and imatrix is not None:
                    extra["imatrix"] = {"path": str(Path(imatrix).resolve()),
                                        "tensors": sum(t.imatrix is not None for t in plan.text)}
                if onnx_vision:
                    progress.status(f"writing {VISION_ONNX_FILE} ({vision_onnx})")
                    tmp = folder.temp(VISION_ONNX_FILE)
                    data_tmp = folder.temp(VISION_ONNX_FILE + ".data")
                    write_vision_onnx(ckpt, spec, tmp, data_tmp, vision_onnx)
                    extra["vision_onnx"] = {"preset": vision_onnx}
                    # the queries per attention block, so the memory estimate counts one block's scores, not all
                    entry = {"size": tmp.stat().st_size, "sha256": sha256_file(tmp), "preset": vision_onnx,
                             "attention_block": ATTENTION_BLOCK}
                    if data_tmp.exists():
                        entry["data_size"] = data_tmp.stat().st_size
                    extra["vision_onnx_file"] = entry
                manifest = _write_all(ckpt, plan, vocab, pre, mmproj_type, name, folder, total, threads, progress,
                                      extra)
            finally:
                progress.end()
    return manifest


def _write_all(ckpt: Checkpoint, plan: ConversionPlan, vocab: Vocabulary, pre: Preset, mmproj_type: str, name: str,
               folder: AtomicFolder, total: int, threads: int | None, progress: Progress,
               extra: dict[str, Any]) -> dict[str, Any]:
    spec = plan.spec
    progress.begin("Converting", total, len(plan.text) + len(plan.vision))

    def text_metadata(w: gguf.GGUFWriter) -> None:
        gemma3.write_text_metadata(w, spec, name)
        w.add_file_type(int(pre.file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocabulary(w, vocab)

    text_tmp = folder.temp(TEXT_FILE)
    text_sha, errors = write_gguf(text_tmp, "gemma3", text_metadata, plan.text, ckpt, progress, threads)
    # read back with ggml's own parser: what llama.cpp will see (gguf-py's reader would also cost ~700 MB
    # of Python objects for a 262k-token vocabulary)
    reader = read_gguf_info(text_tmp)
    verify_text(text_tmp, reader, plan, vocab, {fit(pre.default, spec.text.hidden)})
    verify_layout(text_tmp, reader)
    manifest_files = {TEXT_FILE: _file_entry(text_tmp, reader, text_sha)}
    del reader

    if spec.vision is not None:
        mm_tmp = folder.temp(MMPROJ_FILE)
        qtype = MMPROJ_TYPES[mmproj_type]
        mean = ckpt.processor_config.get("image_mean", [0.5, 0.5, 0.5])
        std = ckpt.processor_config.get("image_std", [0.5, 0.5, 0.5])

        def mm_metadata(w: gguf.GGUFWriter) -> None:
            gemma3.write_mmproj_metadata(w, spec, f"{name} vision projector", list(mean), list(std))
            w.add_file_type(int(MMPROJ_FILE_TYPES[qtype]))

        mm_sha, _ = write_gguf(mm_tmp, "clip", mm_metadata, plan.vision, ckpt, progress, threads)
        reader = read_gguf_info(mm_tmp)
        verify_mmproj(mm_tmp, reader, plan)
        verify_layout(mm_tmp, reader)
        manifest_files[MMPROJ_FILE] = _file_entry(mm_tmp, reader, mm_sha)
        del reader

    manifest = {
        "format": "medgemma-cli.model/1",
        "tool": {"name": "medgemma-cli", "version": __version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "kind": "gguf",
        "source": {"path": str(ckpt.folder.resolve()), "architecture": spec.architecture,
                   "config_sha256": ckpt.config_sha256, "name": name},
        "preset": pre.name,
        "mmproj_type": mmproj_type if spec.vision is not None else None,
        "image_size": spec.vision.image_size if spec.vision else None,
        "image_tokens": spec.vision.image_tokens if spec.vision else None,
        "files": manifest_files,
        "quantization": quantization_report(plan, errors),
        **{k: v for k, v in extra.items() if k != "vision_onnx_file"},
    }
    if "vision_onnx_file" in extra:
        manifest["files"][VISION_ONNX_FILE] = extra["vision_onnx_file"]
    tmp = folder.temp(MANIFEST_FILE)
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
