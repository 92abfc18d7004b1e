"""llama.cpp's own quantizer (`llama_model_quantize`), for the K-quant presets."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from gguf import LlamaFileType

from medgemma_cli.errors import OutputError


def llama_quantize(src: Path, dst: Path, file_type: LlamaFileType, threads: int | None = None) -> None:
    """Quantize a GGUF file with llama.cpp's quantizer (the reference our outputs are checked against)."""
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp prints every tensor to stderr otherwise
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = int(threads or os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0:
        raise OutputError(dst, f"llama.cpp's quantizer failed (code {rc}) on {Path(src).name}")
