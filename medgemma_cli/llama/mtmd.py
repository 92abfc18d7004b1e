"""llama.cpp's libmtmd, the only module that calls it: a prompt split at its images, image embeddings, and
embeddings decoded into the text model's context.

`ask` and the parity tests go through the same two calls (`encode`, then `decode_image`), whichever encoder
produced the embeddings: libmtmd's own or ONNX Runtime's.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgemma_cli.errors import InputError, MedgemmaError
from medgemma_cli.native import quiet_stderr

if TYPE_CHECKING:
    from llama_cpp import Llama

BATCH = 512  # tokens per llama_decode call when an image's embeddings go into the context


@dataclass
class MtmdChunks:
    """A tokenized prompt as libmtmd holds it: text chunks (token ids) and image chunks (a token count each)."""
    parts: list[tuple[str, Any]]  # ("text", token ids) | ("image", n_tokens), in prompt order
    _raw: Any = field(repr=False, default=None)  # mtmd_input_chunks pointer; freed by free()

    def free(self) -> None:
        if self._raw is not None:
            from llama_cpp import mtmd_cpp

            mtmd_cpp.mtmd_input_chunks_free(self._raw)
            self._raw = None


class MtmdContext:
    """An mtmd context over an mmproj file, bound to a loaded text model (mtmd needs its vocab and width)."""

    def __init__(self, llama: Llama, mmproj: Path | str, threads: int | None = None, use_gpu: bool = False,
                 verbose: bool = False):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self._m = mtmd_cpp
        self._llama = llama  # keep the model alive as long as we are
        self.verbose = verbose
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.warmup = False
        params.n_threads = int(threads or os.cpu_count() or 1)
        with quiet_stderr(not verbose):  # clip's loader lists every tensor on stderr
            self._ctx = mtmd_cpp.mtmd_init_from_file(os.fsencode(mmproj), llama._model.model, params)
        if not self._ctx:
            raise InputError(mmproj, "llama.cpp could not load this vision projector (mmproj)")
        self.n_embd = llama_cpp.llama_model_n_embd(llama._model.model)
        self.marker = mtmd_cpp.mtmd_default_marker().decode()

    def tokenize(self, text: str, images: list[np.ndarray]) -> MtmdChunks:
        """Split `text` at its markers (one per image, in order) into text and image chunks."""
        m = self._m
        bitmaps = []
        for rgb in images:
            rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
            if rgb.ndim != 3 or rgb.shape[2] != 3:
                raise ValueError("expected H×W×3 uint8 images")
            # libmtmd copies the pixels into the chunk when tokenizing; the bitmap is freed right after
            bitmaps.append(m.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0],
                                              rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))))
        arr = (m.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
        raw = m.mtmd_input_chunks_init()
        inp = m.mtmd_input_text()
        encoded = text.encode("utf-8")
        inp.text, inp.text_len, inp.add_special, inp.parse_special = encoded, len(encoded), False, True
        try:
            with quiet_stderr(not self.verbose):  # libmtmd logs the whole prompt otherwise: notes included
                rc = m.mtmd_tokenize(self._ctx, raw, ctypes.byref(inp), arr, len(bitmaps))
        finally:
            for b in bitmaps:
                m.mtmd_bitmap_free(b)
        if rc != 0:
            m.mtmd_input_chunks_free(raw)
            raise MedgemmaError(f"libmtmd could not tokenize the prompt (code {rc})")
        parts: list[tuple[str, Any]] = []
        for i in range(m.mtmd_input_chunks_size(raw)):
            c = m.mtmd_input_chunks_get(raw, i)
            if m.mtmd_input_chunk_get_type(c) == m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                ptr = m.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                parts.append(("text", [ptr[j] for j in range(n.value)]))
            else:
                parts.append(("image", m.mtmd_input_chunk_get_n_tokens(c)))
        return MtmdChunks(parts, raw)

    def encode(self, chunks: MtmdChunks, index: int) -> np.ndarray:
        """Embeddings [image tokens, text width] of image chunk `index`, by libmtmd's vision encoder."""
        m = self._m
        c = self._chunk(chunks, index)
        if m.mtmd_encode_chunk(self._ctx, c) != 0:
            raise MedgemmaError(f"libmtmd could not encode image chunk {index}")
        n = m.mtmd_input_chunk_get_n_tokens(c)
        ptr = m.mtmd_get_output_embd(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n * self.n_embd,)).reshape(n, self.n_embd).copy()

    def decode_image(self, llama_ctx: Any, chunks: MtmdChunks, index: int, embeddings: np.ndarray, n_past: int
                     ) -> int:
        """Put image chunk `index` into the context at `n_past` from its embeddings (from either encoder), with
        the attention the model wants over image tokens; returns the position after it."""
        m = self._m
        c = self._chunk(chunks, index)
        n = m.mtmd_input_chunk_get_n_tokens(c)
        embd = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embd.shape != (n, self.n_embd):
            raise MedgemmaError(f"image embeddings of shape {embd.shape}; the model wants ({n}, {self.n_embd})")
        import llama_cpp

        new_n_past = llama_cpp.llama_pos(n_past)
        # a NULL callback: ctypes takes None for NULL, which typeshed's cast() leaves out
        no_callback = ctypes.cast(None, m.mtmd_helper_post_decode_callback)  # type: ignore[arg-type]
        with quiet_stderr(not self.verbose):
            rc = m.mtmd_helper_decode_image_chunk(self._ctx, llama_ctx, c,
                                                  embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n_past, 0,
                                                  BATCH, ctypes.byref(new_n_past), no_callback, None)
        if rc != 0:
            raise MedgemmaError(f"llama.cpp failed to evaluate image chunk {index} (code {rc})")
        return int(new_n_past.value)

    def encode_image(self, rgb: np.ndarray) -> np.ndarray:
        """One image's embeddings, through the same tokenize and encode calls a prompt's images go through."""
        chunks = self.tokenize(self.marker, [rgb])
        try:
            index = next(i for i, (kind, _) in enumerate(chunks.parts) if kind == "image")
            return self.encode(chunks, index)
        finally:
            chunks.free()

    def _chunk(self, chunks: MtmdChunks, index: int) -> Any:
        if chunks._raw is None:
            raise MedgemmaError("these prompt chunks were already freed")
        if chunks.parts[index][0] != "image":
            raise MedgemmaError(f"prompt chunk {index} is text, not an image")
        return self._m.mtmd_input_chunks_get(chunks._raw, index)

    def close(self) -> None:
        if self._ctx:
            self._m.mtmd_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> MtmdContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
