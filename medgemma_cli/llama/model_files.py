"""Which GGUF files a model is (a converted folder, explicit files, a name in the store), checked before
llama.cpp sees them: a corrupt file is one line naming it, not an abort in llama.cpp's loader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medgemma_cli.errors import InputError
from medgemma_cli.kernels.ggml import read_gguf_info
from medgemma_cli.native import quiet_stderr


@dataclass(frozen=True)
class ModelFiles:
    text: Path
    mmproj: Path | None
    name: str
    vision_onnx: Path | None = None
    # queries per attention block in vision.onnx, from its manifest entry; None: every score at once (files
    # converted before the blocks, or a manifest without the entry)
    vision_onnx_attention_block: int | None = None

    @property
    def vision(self) -> dict[str, int] | None:
        """Image size and tokens per image, read from the mmproj as llama.cpp will."""
        if self.mmproj is None:
            return None
        info = read_gguf_info(self.mmproj, keys={"clip.vision.image_size", "clip.vision.patch_size",
                                                 "clip.vision.projector.scale_factor", "clip.projector_type"})
        size, patch = int(info.get("clip.vision.image_size")), int(info.get("clip.vision.patch_size"))
        scale = int(info.get("clip.vision.projector.scale_factor", 4))
        return {"image_size": size, "image_tokens": ((size // patch) // scale) ** 2}


def resolve_model(model: Path | None = None, gguf: Path | None = None, mmproj: Path | None = None) -> ModelFiles:
    """A converted folder, explicit GGUF files, or the newest model in the store."""
    from medgemma_cli import store

    if gguf is not None:
        if not Path(gguf).is_file():
            raise InputError(gguf, "no such GGUF file")
        if mmproj is not None and not Path(mmproj).is_file():
            raise InputError(mmproj, "no such mmproj file")
        for path in (gguf, mmproj):  # files from elsewhere have no manifest: their structure is checked instead
            if path is not None:
                check_gguf(Path(path))
        return ModelFiles(Path(gguf), Path(mmproj) if mmproj else None, Path(gguf).stem)
    if model is None:
        model = store.newest("gguf", "MedGemma")
    model = Path(model)
    if (model / "text.gguf").is_file() or (model / store.MANIFEST).is_file():
        has = store.verified_manifest(model, "gguf", "MedGemma GGUF")["files"]
        if "text.gguf" not in has:
            raise InputError(model / store.MANIFEST, "lists no text.gguf; convert again")
        entry = has.get("vision.onnx")
        block = entry.get("attention_block") if isinstance(entry, dict) else None
        return ModelFiles(model / "text.gguf", model / "mmproj.gguf" if "mmproj.gguf" in has else None, model.name,
                          model / "vision.onnx" if "vision.onnx" in has else None,
                          block if type(block) is int and block > 0 else None)
    if model.is_dir():
        raise InputError(model, "no text.gguf here (is this a folder written by `medgemma convert`?)")
    named = store.models_dir() / str(model)
    if (named / "text.gguf").is_file():
        return resolve_model(named)
    raise InputError(model, "no such model folder (see `medgemma models`)")


def check_gguf(path: Path) -> None:
    """Parse a GGUF from elsewhere with ggml's reader and check every tensor lies inside the file, so that a
    corrupt file is one line naming it rather than an abort inside llama.cpp's loader."""
    from medgemma_cli.kernels.ggml import GgmlLibraryError

    try:
        with quiet_stderr():  # ggml explains on stderr why it refuses; the one line below says it for the user
            info = read_gguf_info(path, keys={"general.architecture"})
    except GgmlLibraryError:
        raise InputError(path, "not a readable GGUF file (corrupt or truncated)") from None
    except UnicodeDecodeError:
        raise InputError(path, "not a readable GGUF file (a tensor or key name is not UTF-8)") from None
    size = path.stat().st_size
    for t in info.tensors:
        if t.offset < 0 or t.offset + t.size > size:
            raise InputError(path, f"tensor {t.name!r} lies beyond the end of the file (truncated?)")
    if "general.architecture" not in info.kv:
        raise InputError(path, "a GGUF file without general.architecture: not a model")


def vision_backend_for(files: ModelFiles, requested: str, gpu_layers: int | None) -> str:
    """The image encoder a run uses: ONNX Runtime (int8, the fast one on CPUs) where the layers stay on the CPU
    and a vision.onnx exists, libmtmd where they sit on a GPU or when asked for. One rule, so that the engine,
    the memory and time estimates and the caches' keys name the same encoder."""
    if files.mmproj is None:
        return "none"
    if files.vision_onnx is not None and requested != "mtmd":
        if requested == "onnx" or gpu_layers == 0:
            return "onnx"
        if gpu_layers is None:
            import llama_cpp

            return "mtmd" if llama_cpp.llama_supports_gpu_offload() else "onnx"
    return "mtmd"
