"""What a later question about the same study need not compute again: the images' embeddings (keyed by the
vision model and the exact pixels sent) and the context after the images and notes (keyed by the model and the
exact prompt up to the question). Both live in the model store's cache folder, never beside results.

Embeddings are kept as float16; a freshly encoded image goes through the same rounding before the model reads
it, so an answer is the same whether its images came from the encoder or from the cache.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgemma_cli.defaults import DEFAULT_CACHE_GB
from medgemma_cli.disk_cache import GB, CacheUsage, DiskCache, cache_key

if TYPE_CHECKING:
    from medgemma_cli.llama.engine import Engine
    from medgemma_cli.llama.model_files import ModelFiles


def open_cache(max_gb: float) -> DiskCache:
    from medgemma_cli import store

    return DiskCache(store.cache_dir() / "reuse", int(max_gb * GB))


def file_identity(path: Path) -> str:
    """A model file's SHA-256, hashed once per version of the file (remembered in the store)."""
    from medgemma_cli import store
    from medgemma_cli.checksums import remembered_sha256

    return remembered_sha256(path, store.cache_dir() / "checksums.json")


def vision_file(files: ModelFiles, backend: str) -> Path | None:
    """The file whose encoder makes a model's image embeddings on `backend` (onnx | mtmd | none)."""
    return files.vision_onnx if backend == "onnx" else files.mmproj if backend == "mtmd" else None


def vision_identity(files: ModelFiles, backend: str) -> str:
    """Which encoder makes the image embeddings: its backend and its file's SHA-256."""
    path = vision_file(files, backend)
    return f"{backend}:{file_identity(path) if path is not None else 'none'}"


def context_identity(files: ModelFiles, backend: str, kv_type: str, swa_full: bool) -> str:
    """What a saved context depends on besides its prompt: the text model, the image encoder, the cache's number
    format and whether the sliding-window layers kept every position (a window-sized cache saves another state)."""
    return (f"text:{file_identity(files.text)}|{vision_identity(files, backend)}|kv:{kv_type}|"
            f"swa_full:{int(swa_full)}")


class EmbeddingCache:
    KIND = "embeddings"

    def __init__(self, cache: DiskCache, vision_identity: str):
        self.cache, self.identity = cache, vision_identity
        self.hits = self.misses = 0

    def _key(self, rgb: np.ndarray) -> str:
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        return cache_key("embedding-v1", self.identity, repr(rgb.shape), rgb.tobytes())

    def has(self, rgb: np.ndarray) -> bool:
        return self.cache.contains(self.KIND, self._key(rgb))

    def get(self, rgb: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray | None:
        path = self.cache.get(self.KIND, self._key(rgb))
        if path is not None:
            try:
                embd = np.load(path, allow_pickle=False)
                if embd.dtype == np.float16 and embd.ndim == 2 and (shape is None or embd.shape == shape):
                    self.hits += 1
                    return embd.astype(np.float32)
            except (OSError, ValueError):
                pass
        self.misses += 1
        return None

    def put(self, rgb: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """Store the embeddings; returns what the model should read (the float16 values, as a hit would give)."""
        half = np.ascontiguousarray(embeddings, dtype=np.float16)
        buf = io.BytesIO()
        np.save(buf, half, allow_pickle=False)
        try:
            self.cache.put_bytes(self.KIND, self._key(rgb), buf.getvalue())
        except OSError:
            pass  # a full or read-only store: the answer does not need the cache
        return half.astype(np.float32)


class PromptCache:
    """The context after a prompt's images and notes, saved with llama.cpp's sequence state files."""
    KIND = "prompts"

    def __init__(self, cache: DiskCache, identity: str):
        self.cache, self.identity = cache, identity

    def key(self, messages: list[dict[str, Any]], images: list[np.ndarray]) -> str:
        """The exact prompt up to the question: its messages (system, notes, labels, where each image goes) and
        each image's pixels; with the identity, what the saved context holds."""
        text = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        parts: list[bytes | str] = ["prompt-v2", self.identity, text]
        for rgb in images:
            rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
            parts += [repr(rgb.shape), rgb.tobytes()]
        return cache_key(*parts)

    def has(self, key: str) -> bool:
        return self.cache.contains(self.KIND, key)

    def restore(self, engine: Engine, key: str, n_tokens: int) -> bool:
        """Load the saved context into the engine's (empty) context; False when there is none or it does not fit."""
        path = self.cache.get(self.KIND, key)
        return path is not None and engine.load_prefix(path, n_tokens)

    def save(self, engine: Engine, key: str) -> bool:
        try:
            return self.cache.put(self.KIND, key, engine.save_prefix) is not None
        except OSError:
            return False  # a full or read-only store: the answer does not need the cache


def save_state(llama_ctx: object, path: Path) -> None:
    import llama_cpp

    no_tokens = (llama_cpp.llama_token * 1)()
    if llama_cpp.llama_state_seq_save_file(llama_ctx, os.fsencode(path), 0, no_tokens, 0) == 0:
        raise OSError(f"llama.cpp could not save the context to {path}")


def load_state(llama_ctx: object, path: Path) -> bool:
    import llama_cpp

    tokens = (llama_cpp.llama_token * 1)()
    n_out = ctypes.c_size_t(0)
    return llama_cpp.llama_state_seq_load_file(llama_ctx, os.fsencode(path), 0, tokens, 1, ctypes.byref(n_out)) > 0


def cache_usage() -> CacheUsage:
    """What the store's cache folder holds (image embeddings and prompt states)."""
    return open_cache(DEFAULT_CACHE_GB).usage()


def clear_cache() -> CacheUsage:
    """Remove every cached embedding and prompt state; returns what was removed."""
    return open_cache(DEFAULT_CACHE_GB).clear()
