"""`medgemma convert`: any supported checkpoint folder → a model folder in the store (or where asked)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgemma_cli import store
from medgemma_cli.containment import stage
from medgemma_cli.converters.gguf_convert import convert_gguf
from medgemma_cli.kernels.policy import DEFAULT_MMPROJ_TYPE, DEFAULT_PRESET
from medgemma_cli.progress import Progress


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    manifest: dict[str, Any]


def default_output(src: Path, preset: str) -> Path:
    return store.models_dir() / f"{Path(src).resolve().name}-{preset.lower()}"


def _is_siglip(src: Path) -> bool:
    from medgemma_cli.converters.checkpoint import read_json
    from medgemma_cli.converters.siglip_convert import is_siglip

    return is_siglip(read_json(Path(src) / "config.json")) if Path(src).is_dir() else False


def convert(src: Path | str, out: Path | str | None = None, *, preset: str | None = None,
            mmproj_type: str = DEFAULT_MMPROJ_TYPE, overwrite: bool = False, threads: int | None = None,
            imatrix: Path | str | None = None, vision_onnx: str = "int8",
            progress: Progress | None = None) -> ConvertResult:
    """Convert a Hugging Face checkpoint folder: MedGemma → GGUF for llama.cpp, MedSigLIP → ONNX.

    Output goes to `out`, or to the model store (`medgemma models` lists it) when `out` is None. The preset
    is a GGUF preset (default Q4_K_M) for MedGemma, or fp32/int8/q4 (default int8) for MedSigLIP.
    """
    src = Path(src)
    if _is_siglip(src):
        from medgemma_cli.converters.siglip_convert import convert_siglip

        preset = (preset or "int8").lower()
        target = Path(out) if out is not None else default_output(src, preset)
        with stage("ONNX", "converting MedSigLIP"):
            manifest = convert_siglip(src, target, preset, overwrite=overwrite, progress=progress)
        store.remember_verified(target, manifest)  # hashed while converting: the first load need not
        return ConvertResult(target, manifest)
    preset = preset or DEFAULT_PRESET
    target = Path(out) if out is not None else default_output(src, preset)
    with stage("ggml", "converting the checkpoint"):
        manifest = convert_gguf(src, target, preset, mmproj_type, overwrite=overwrite, threads=threads,
                                imatrix=imatrix, vision_onnx=vision_onnx, progress=progress)
    store.remember_verified(target, manifest)
    return ConvertResult(target, manifest)
