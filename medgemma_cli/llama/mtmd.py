"""Image embeddings through llama.cpp's libmtmd, the same code path `ask` uses to see images."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medgemma_cli.errors import InputError

if TYPE_CHECKING:
    from llama_cpp import Llama


class MtmdVisionEncoder:
    """An mtmd context over an mmproj file, bound to a loaded text model (mtmd needs its vocab and width)."""

    def __init__(self, llama: Llama, mmproj: Path | str, threads: int | None = None, use_gpu: bool = False,
                 verbose: bool = False):
        from llama_cpp import mtmd_cpp

        from medgemma_cli.native import quiet_stderr

        self._m = mtmd_cpp
        self._llama = llama  # keep the model alive as long as we are
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.warmup = False
        params.n_threads = int(threads or os.cpu_count() or 1)
        with quiet_stderr(not verbose):  # clip's loader lists every tensor on stderr
            self._ctx = mtmd_cpp.mtmd_init_from_file(os.fsencode(mmproj), llama._model.model, params)
        if not self._ctx:
            raise InputError(mmproj, "llama.cpp could not load this vision projector (mmproj)")
        import llama_cpp

        self.n_embd = llama_cpp.llama_model_n_embd(llama._model.model)

    def encode(self, rgb: np.ndarray) -> np.ndarray:
        """Embeddings [image tokens, text width] of one RGB uint8 image (already at the model's input size)."""
        m = self._m
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError("expected an H×W×3 uint8 image")
        h, w, _ = rgb.shape
        bitmap = m.mtmd_bitmap_init(w, h, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = m.mtmd_input_chunks_init()
        try:
            text = m.mtmd_input_text()
            marker = m.mtmd_default_marker()
            text.text = marker
            text.text_len = len(marker)
            text.add_special = False
            text.parse_special = True
            bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if m.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise RuntimeError("mtmd_tokenize failed")
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue
                n = m.mtmd_input_chunk_get_n_tokens(chunk)
                if m.mtmd_encode_chunk(self._ctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
                ptr = m.mtmd_get_output_embd(self._ctx)
                return np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()
            raise RuntimeError("mtmd produced no image chunk")
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    @property
    def ctx(self) -> object:
        """The mtmd context, for callers that tokenize and decode whole prompts (the runtime's Engine)."""
        return self._ctx

    def close(self) -> None:
        if self._ctx:
            self._m.mtmd_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> MtmdVisionEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
