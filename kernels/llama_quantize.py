"""llama.cpp's own quantizer (`llama_model_quantize`): the reference our one-pass output is checked against,
and the two-pass route the benchmark compares with."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from gguf import LlamaFileType

from medgemma_cli.errors import InputError, OutputError
from medgemma_cli.kernels.ggml import read_gguf_info


def llama_quantize(src: Path, dst: Path, file_type: LlamaFileType, threads: int | None = None,
                   imatrix: Mapping[str, np.ndarray] | None = None) -> None:
    """Quantize a GGUF file with llama.cpp's quantizer, optionally with importance-matrix values per tensor."""
    import llama_cpp
    from llama_cpp import _logger

    alignment = read_gguf_info(src, keys={"general.alignment"}).get("general.alignment")
    if alignment not in (None, 32):
        # llama.cpp's quantizer copies the key but pads its own output to 32 bytes: the file would not load
        raise InputError(src, f"llama.cpp's quantizer cannot take a GGUF with general.alignment = {alignment}")
    _logger.set_verbose(False)  # llama.cpp prints every tensor to stderr otherwise
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    params.nthread = int(threads or os.cpu_count() or 1)
    keep: list[Any] = []  # what the parameters point into, alive until the quantizer returns
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        params.imatrix = entries  # the zeroed last entry (name NULL) ends the list
        keep.append(entries)
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0:
        raise OutputError(dst, f"llama.cpp's quantizer failed (code {rc}) on {Path(src).name}")
