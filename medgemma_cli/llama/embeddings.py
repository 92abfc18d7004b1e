"""Images into the text model's context without libmtmd, for when ONNX Runtime encodes them.

libmtmd needs the mmproj's weights loaded (0.85 GB at F16 for MedGemma 4B) just to split a prompt at its images
and to put embeddings into the context. When vision.onnx encodes the images, neither needs the projector: the
prompt is split here exactly as libmtmd splits it for Gemma 3 (`<start_of_image>` ending the text before an
image, `<end_of_image>` starting the text after it, each text piece tokenized on its own with special tokens
parsed), and the embeddings go through a `llama_batch` with non-causal attention over the image, the calls
libmtmd's decode helper makes. The parity test holds both routes to the same tokens and the same logits.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from medgemma_cli.errors import MedgemmaError

BOI, EOI = "<start_of_image>", "<end_of_image>"  # Gemma 3's image delimiters, as libmtmd inserts them
IMAGE_MARK = "\x00IMAGE\x00"  # where an image goes, while we split the prompt (never in text we tokenize)
BATCH = 512  # embeddings per llama_decode call, as for libmtmd's helper (mtmd.BATCH)


def split_at_images(marked: str, marker: str, n_images: int, image_tokens: int,
                    tokenize: Callable[[str], list[int]]) -> list[tuple[str, Any]]:
    """The parts of a prompt whose images are `marker`s (chat_template.with_media_markers), ("text", ids) |
    ("image", n_tokens), each image between its delimiters, as `MtmdContext.tokenize` returns them."""
    segments = marked.split(marker)
    if len(segments) - 1 != n_images:
        raise MedgemmaError(f"the prompt has {len(segments) - 1} image places for {n_images} images")
    parts: list[tuple[str, Any]] = []
    for k, seg in enumerate(segments):
        ids = tokenize((EOI if k else "") + seg + (BOI if k < n_images else ""))
        if ids:
            parts.append(("text", ids))
        if k < n_images:
            parts.append(("image", image_tokens))
    return parts


def decode_embeddings(lib: Any, ctx: Any, embeddings: np.ndarray, n_past: int, n_embd: int) -> int:
    """Put one image's embeddings into the context at `n_past` (sequence 0, no logits), the image's tokens
    attending to each other both ways as Gemma 3 wants; returns the position after the image."""
    embd = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = embd.shape[0]
    if embd.ndim != 2 or embd.shape[1] != n_embd:
        raise MedgemmaError(f"image embeddings of shape {embd.shape}; the model wants ({n}, {n_embd})")
    lib.llama_set_causal_attn(ctx, False)
    try:
        for start in range(0, n, BATCH):
            part = embd[start:start + BATCH]
            batch = lib.llama_batch_init(len(part), n_embd, 1)
            try:
                ctypes.memmove(batch.embd, part.ctypes.data, part.nbytes)
                for j in range(len(part)):
                    batch.pos[j] = n_past + start + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = False
                batch.n_tokens = len(part)
                if lib.llama_decode(ctx, batch) != 0:
                    raise MedgemmaError("llama.cpp failed to evaluate an image's embeddings (context full?)")
            finally:
                lib.llama_batch_free(batch)
    finally:
        lib.llama_set_causal_attn(ctx, True)
    return n_past + n
