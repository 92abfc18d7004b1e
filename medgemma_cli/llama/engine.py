"""MedGemma on llama.cpp: the model's own chat template, images through libmtmd, tokens streamed out.

We drive llama.cpp at the level of chunks (text tokens, image embeddings) rather than through
llama-cpp-python's chat handlers, so that we control exactly what the model sees (our square images,
the processor's "\\n\\n" around each image), can time image encoding apart from text, and can keep the KV
state of a prompt for follow-up questions.
"""

from __future__ import annotations

import codecs
import ctypes
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_cli import stopping
from medgemma_cli.chat_template import compile_template, render, with_media_markers
from medgemma_cli.containment import stage
from medgemma_cli.disk_cache import DiskCache
from medgemma_cli.errors import InputError, MedgemmaError
from medgemma_cli.llama.caches import (
    EmbeddingCache,
    context_identity,
    load_state,
    save_state,
    vision_file,
    vision_identity,
)
from medgemma_cli.llama.embeddings import IMAGE_MARK, decode_embeddings, split_at_images
from medgemma_cli.llama.grammar import THINK_CLOSE, THINK_OPEN, Constraint, GrammarSampler
from medgemma_cli.llama.loader import kv_cache_params, load_llama
from medgemma_cli.llama.model_files import ModelFiles, vision_backend_for
from medgemma_cli.llama.mtmd import MtmdChunks, MtmdContext
from medgemma_cli.llama.onnx_vision import OnnxVision
from medgemma_cli.llama.utf8 import OddPieces, Utf8Guard
from medgemma_cli.machine import physical_cores
from medgemma_cli.native import quiet_stderr

VISION_BACKENDS = ("auto", "onnx", "mtmd")
KV_TYPES = ("f16", "q8_0")
# tests only: every graph node of a multi-token decode takes this many more milliseconds, slept in native code
# (libc usleep) by the abort callback, so that a test can stop a prefill midway without a big model
SLOW_NODES_TEST_ENV = "MEDGEMMA_TEST_SLOW_NODES_MS"


@dataclass
class Timings:
    load_s: float = 0.0
    image_encode_s: float = 0.0
    prefill_s: float = 0.0  # images included
    image_decode_s: float = 0.0  # putting the images' embeddings (from either encoder) into the context
    first_token_s: float = 0.0  # from the start of prefill
    decode_s: float = 0.0


@dataclass
class Generated:
    """What `Engine.generate` sampled after the prompt."""
    text: str  # the answer, thinking trace left out
    thinking: str  # the trace between MedGemma's thinking markers, if any
    tokens: int
    stopped: str  # eos | max_tokens | context_full | grammar (nothing the grammar allows is left)
    closed_early: bool = False  # a constraint cut the prelude (thinking, reasoning) to leave room for the JSON


class Engine:
    """One text model (+ vision projector) loaded in llama.cpp, with a context of `n_ctx` tokens."""

    def __init__(self, files: ModelFiles, n_ctx: int = 4096, threads: int | None = None, gpu_layers: int | None = None,
                 verbose: bool = False, vision_backend: str = "auto", kv_type: str = "f16", swa_full: bool = True,
                 cache: DiskCache | None = None):
        """`swa_full=False` sizes the sliding-window layers' cache to the window: far less memory on long prompts,
        the same arithmetic, but the context can then not be cut back (no follow-up from a reused prefix).
        `cache`: the store's cache, for image embeddings encoded before (and for later runs)."""
        import llama_cpp
        from llama_cpp import _logger

        _logger.set_verbose(verbose)
        self.files = files
        self.verbose = verbose
        t0 = time.perf_counter()
        threads = threads or physical_cores()
        self.threads = threads
        if gpu_layers is None:
            gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        self.gpu_layers = gpu_layers
        if vision_backend not in VISION_BACKENDS:
            raise MedgemmaError(f"unknown vision backend {vision_backend!r}; "
                                f"choose one of {', '.join(VISION_BACKENDS)}")
        if kv_type not in KV_TYPES:
            raise MedgemmaError(f"unknown KV cache type {kv_type!r}; choose one of {', '.join(KV_TYPES)}")
        self.kv_type, self.swa_full = kv_type, swa_full
        # deferred (stopping.abortable): llama.cpp logs through a Python callback, where a raised stop would be lost
        with stage("llama.cpp", "loading the model"), quiet_stderr(not verbose), stopping.abortable():
            self.llm = load_llama(files.text, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                  n_threads_batch=threads, n_gpu_layers=gpu_layers, verbose=verbose,
                                  swa_full=swa_full, **kv_cache_params(kv_type))
        self._lib = llama_cpp
        self.ctx = self.llm._ctx.ctx
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self.n_embd = llama_cpp.llama_model_n_embd(self.llm._model.model)
        self.n_ctx = n_ctx
        self.mtmd: MtmdContext | None = None
        self.onnx_vision: OnnxVision | None = None
        self.vision_released = False
        self._onnx_threads = threads
        self.image_tokens = 0
        self.vision_backend = "none"
        if files.mmproj is not None:
            if vision_backend == "onnx" and files.vision_onnx is None:
                raise MedgemmaError(f"{files.text.parent}: no vision.onnx; convert with `--vision-onnx int8`, or use "
                                    "--vision-backend mtmd")
            vision = files.vision or {}
            self.image_tokens = int(vision.get("image_tokens", 0))
            if vision_backend_for(files, vision_backend, gpu_layers) == "onnx":
                # libmtmd's projector weights are not loaded at all: the prompt is split and the embeddings
                # decoded without it (embeddings.py); ONNX Runtime loads at the first image that needs it
                # (none, when the caller encoded the images before the text model loaded: encode_first)
                self.vision_backend = "onnx"
            else:
                with stage("llama.cpp", "loading the vision projector"):
                    self.mtmd = MtmdContext(self.llm, files.mmproj, threads, use_gpu=gpu_layers != 0,
                                            verbose=verbose)
                self.vision_backend = "mtmd"
        self.load_s = time.perf_counter() - t0
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise InputError(files.text, "the GGUF has no chat template (tokenizer.chat_template)")
        self.template = compile_template(template)
        self.bos = self._piece(llama_cpp.llama_vocab_bos(self.vocab), special=True)
        self.think_ids = (self.token_id(THINK_OPEN), self.token_id(THINK_CLOSE))
        self.n_past = 0
        self.abandoned = False  # a stop ended a decode midway: what the context holds is not what n_past says
        self._abort_callback = _abort_callback(llama_cpp)  # kept here: llama.cpp holds only its address
        self.images_encoded = 0
        self._odd: OddPieces | None = None
        self.cache = cache
        self.embedding_cache = (EmbeddingCache(cache, vision_identity(files, self.vision_backend))
                                if cache is not None and self.vision_backend != "none" else None)

    @property
    def vision_file(self) -> Path | None:
        """The file whose encoder makes this engine's image embeddings."""
        return vision_file(self.files, self.vision_backend)

    def identity(self) -> str:
        """What a saved context of this engine depends on (caches.context_identity)."""
        return context_identity(self.files, self.vision_backend, self.kv_type, self.swa_full)

    # --- tokens -------------------------------------------------------------------------------------
    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def token_id(self, text: str) -> int | None:
        ids = self.tokenize(text)
        return ids[0] if len(ids) == 1 else None

    def _piece(self, token: int, special: bool = False) -> str:
        return self._piece_bytes(token, special).decode("utf-8", "replace")

    def _piece_bytes(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n] if n > 0 else b""

    def odd_pieces(self) -> OddPieces:
        """The vocabulary's pieces that are not whole UTF-8 characters, read once (0.6 s for Gemma's 262K tokens:
        only asked for when a constrained answer's token has to be refused)."""
        if self._odd is None:
            buf, to_piece = ctypes.create_string_buffer(256), self._lib.llama_token_to_piece

            def piece(token: int) -> bytes:  # _piece_bytes with one buffer for all
                n = to_piece(self.vocab, token, buf, len(buf), 0, False)
                return buf.raw[:n] if n > 0 else b""

            self._odd = OddPieces.scan(map(piece, range(self._lib.llama_vocab_n_tokens(self.vocab))))
        return self._odd

    # --- prompts ------------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]]) -> str:
        return render(self.template, messages, self.bos)

    def chunks(self, prompt: str, images: list[np.ndarray], embeddings: list[np.ndarray] | None = None) -> Chunks:
        """Split the rendered prompt at its images (chat_template.with_media_markers says how); `embeddings`:
        the images already encoded (ONNX Runtime, before the model loaded)."""
        if not images:
            return Chunks([("text", self.tokenize(with_media_markers(prompt, "", 0)))])
        rgbs = [np.ascontiguousarray(rgb, dtype=np.uint8) for rgb in images]
        if embeddings is not None and len(embeddings) != len(images):
            raise MedgemmaError(f"{len(embeddings)} image embeddings for {len(images)} images")
        if self.vision_backend == "onnx" and (embeddings is not None or not self.vision_released):
            marked = with_media_markers(prompt, IMAGE_MARK, len(images))
            return Chunks(split_at_images(marked, IMAGE_MARK, len(images), self.image_tokens, self.tokenize), rgbs,
                          None, embeddings)
        if self.mtmd is None:
            raise MedgemmaError(f"{self.files.text}: images need a vision projector (--mmproj)"
                                if self.vision_backend == "none" else "the vision encoder was already released")
        split = self.mtmd.tokenize(with_media_markers(prompt, self.mtmd.marker, len(images)), images)
        return Chunks(split.parts, rgbs, split)

    # --- running ------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def rewind(self, n_past: int) -> None:
        """Forget everything after position `n_past` (the images and notes before it stay)."""
        if not self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self.ctx), 0, n_past, -1):
            raise MedgemmaError("llama.cpp could not cut the context back (this cache type cannot)")
        self.n_past = n_past

    def cached_images(self, images: list[np.ndarray]) -> int:
        """How many of `images` the embedding cache holds for this engine's encoder."""
        if self.embedding_cache is None:
            return 0
        return sum(self.embedding_cache.has(rgb) for rgb in images)

    def save_prefix(self, path: Path) -> None:
        """Write the context as it is (the prompt so far) to `path`, for a later process to load."""
        save_state(self.ctx, path)

    def load_prefix(self, path: Path, n_tokens: int) -> bool:
        """Load a saved context of `n_tokens` positions into this (cleared) one; False, and an empty context, when
        the file cannot be loaded or holds something else."""
        self.reset()
        with quiet_stderr(not self.verbose):
            loaded = load_state(self.ctx, path)
        n = self._lib.llama_memory_seq_pos_max(self._lib.llama_get_memory(self.ctx), 0) + 1 if loaded else 0
        if n != n_tokens:
            self.reset()
            return False
        self.n_past = n
        return True

    def decode_text(self, text: str, tokens: list[int] | None = None) -> None:
        self._decode_tokens(tokens if tokens is not None else self.tokenize(text), logits_last=True)

    def prefill(self, chunks: Chunks, timings: Timings, logits_last: bool = True,
                on_image: Callable[[int, int], None] | None = None) -> None:
        """Decode the prompt (text and image chunks) after what is already in the context; `on_image(done, total)`
        after each image."""
        if self.n_past + chunks.n_tokens > self.n_ctx:
            raise MedgemmaError(f"the prompt needs {self.n_past + chunks.n_tokens} tokens "
                                f"but the context holds {self.n_ctx}")
        t0 = time.perf_counter()
        last = len(chunks.parts) - 1
        image_index = 0
        for i, (kind, part) in enumerate(chunks.parts):
            if kind == "text":
                self._decode_tokens(part, logits_last=logits_last and i == last)
                continue
            t1 = time.perf_counter()
            rgb = chunks.images[image_index]
            cached = (self.embedding_cache.get(rgb, (part, self.n_embd))
                      if self.embedding_cache is not None and chunks.embeddings is None else None)
            if chunks.embeddings is not None:  # encoded before the model loaded (answering.encode_first)
                embd = chunks.embeddings[image_index]
            elif cached is not None:
                embd = cached
            else:
                if chunks.mtmd is None:  # split by us (split_at_images): ONNX Runtime encodes, we decode
                    with stage("ONNX Runtime", f"encoding image {image_index + 1}"):
                        embd = self._onnx().encode(rgb)
                else:
                    with stage("llama.cpp", f"encoding image {image_index + 1}"), quiet_stderr(not self.verbose):
                        embd = self._mtmd().encode(chunks.mtmd, i)
                self.images_encoded += 1
                if self.embedding_cache is not None:
                    embd = self.embedding_cache.put(rgb, embd)
            t2 = time.perf_counter()
            timings.image_encode_s += t2 - t1
            with stage("llama.cpp", "reading the prompt"), self._stoppable():
                if chunks.mtmd is None:
                    self.n_past = decode_embeddings(self._lib, self.ctx, embd, self.n_past, self.n_embd)
                else:
                    self.n_past = self._mtmd().decode_image(self.ctx, chunks.mtmd, i, embd, self.n_past)
            timings.image_decode_s += time.perf_counter() - t2
            image_index += 1
            if on_image is not None:
                on_image(image_index, len(chunks.images))
        timings.prefill_s += time.perf_counter() - t0

    def _decode_tokens(self, tokens: list[int], logits_last: bool) -> None:
        with stage("llama.cpp", "reading the prompt" if len(tokens) > 1 else "writing the answer"):
            self._decode_batches(tokens, logits_last)

    @contextmanager
    def _stoppable(self, many: bool = True) -> Iterator[None]:
        """Around multi-token decodes (a 512-token batch of the 4B model takes 15-50 s on two loaded cores): a
        stop ends them between two graph nodes (ggml's abort callback, stopping.py) and is raised as the signal's
        exception. The callback is a Python call per graph node, so single tokens (`many` false), which take a
        fraction of a second, go without it. The context is abandoned afterwards: llama.cpp dropped the batch cut
        short, and no decode of any size runs on it again."""
        if self.abandoned:
            raise MedgemmaError("a stopped decode left this context unusable")
        if not many or not stopping.active():
            yield
            return
        import logging

        lib = self._lib
        log = logging.getLogger("llama-cpp-python")  # where llama-cpp-python sends llama.cpp's log
        level = log.level
        lib.llama_set_abort_callback(self.ctx, self._abort_callback, None)
        try:
            # llama.cpp logs the batch it drops as an error; the stop is the user's doing and said in one line
            with stopping.abortable(), stopping.on_stop(lambda: log.setLevel(logging.CRITICAL)):
                try:
                    yield
                finally:
                    self.abandoned = self.abandoned or bool(stopping.requested())
        finally:
            log.setLevel(level)
            # NULL: llama.cpp checks nothing between graph nodes (ctypes takes None for NULL; cast() for typeshed)
            lib.llama_set_abort_callback(self.ctx, ctypes.cast(None, lib.ggml_abort_callback), None)  # type: ignore[arg-type]

    def _decode_batches(self, tokens: list[int], logits_last: bool) -> None:
        with self._stoppable(many=len(tokens) > 1):
            self._decode_unstoppable(tokens, logits_last)

    def _decode_unstoppable(self, tokens: list[int], logits_last: bool) -> None:
        lib = self._lib
        for start in range(0, len(tokens), 512):
            part = tokens[start:start + 512]
            batch = lib.llama_batch_init(len(part), 0, 1)
            try:
                for j, tok in enumerate(part):
                    batch.token[j] = tok
                    batch.pos[j] = self.n_past + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = logits_last and start + j == len(tokens) - 1
                batch.n_tokens = len(part)
                if lib.llama_decode(self.ctx, batch) != 0:
                    raise MedgemmaError("llama.cpp failed to decode (context full?)")
            finally:
                lib.llama_batch_free(batch)
            self.n_past += len(part)

    def generate(self, max_tokens: int, temperature: float = 0.0, seed: int = 0, show_thinking: bool = False,
                 on_text: Callable[[str], None] | None = None, timings: Timings | None = None,
                 started: float | None = None, stop_at_eos: bool = True,
                 constraint: Constraint | None = None) -> Generated:
        """Sample after the prefilled prompt; stream visible text (the thinking trace only if asked).

        With a `constraint`, only tokens its grammar allows are sampled (greedy: the best token is checked
        first, and the whole vocabulary masked only when the grammar refuses it), and only tokens that keep the
        answer valid UTF-8 (utf8.py; the answer then never holds U+FFFD for bytes the grammar counted otherwise).
        Should it stop (max_tokens, context_full) in the middle of a character, the answer ends at its last whole
        character: the unfinished bytes are left out, not replaced, and `stopped` says it was cut. Unconstrained
        answers keep the model's tokens as llama.cpp samples them (a server's answer equals ours token for token);
        bytes that are not UTF-8 show there as U+FFFD."""
        lib = self._lib
        timings = timings or Timings()
        rng = np.random.default_rng(seed)
        n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        answer: list[str] = []
        thinking: list[str] = []
        in_thought = False
        t0 = time.perf_counter()
        started = started if started is not None else t0
        stopped = "max_tokens"
        grammar = GrammarSampler(lib, self.vocab, n_vocab, constraint.grammar) if constraint else None
        guard = Utf8Guard(self.odd_pieces) if constraint else None
        closed_early = False
        n = 0
        try:
            for n in range(1, max_tokens + 1):
                if (constraint is not None and not closed_early and constraint.closing is not None
                        and max_tokens - n + 1 <= constraint.reserve
                        and constraint.in_prelude("".join(answer), in_thought)):
                    closing = constraint.closing_in_thought if in_thought else constraint.closing
                    assert grammar is not None and closing is not None
                    grammar.close()
                    grammar = GrammarSampler(lib, self.vocab, n_vocab, closing)
                    closed_early = True
                    if guard is not None and guard.pending:  # the new grammar starts between characters: the
                        guard.drop()  # prelude's unfinished one is left out (its cut is said: closed_early)
                        decoder.reset()
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, -1), shape=(n_vocab,))
                tok = self._choose(logits, temperature, rng, grammar)
                if guard is not None and tok is not None and not guard.allows(self._text_bytes(tok, stop_at_eos)):
                    tok = self._choose(guard.mask(logits), temperature, rng, grammar)
                if tok is None:
                    stopped = "grammar"
                    n -= 1
                    break
                if n == 1:
                    timings.first_token_s = time.perf_counter() - started
                if stop_at_eos and lib.llama_vocab_is_eog(self.vocab, tok):
                    stopped = "eos"
                    n -= 1
                    break
                if grammar is not None:
                    grammar.accept(tok)
                if tok == self.think_ids[0] and self.think_ids[0] is not None:
                    in_thought = True
                elif tok == self.think_ids[1] and self.think_ids[1] is not None:
                    in_thought = False
                else:
                    piece = self._piece_bytes(tok)
                    if guard is not None:
                        guard.accept(piece)
                    text = decoder.decode(piece)
                    (thinking if in_thought else answer).append(text)
                    if on_text and text and (show_thinking or not in_thought):
                        on_text(text)
                if self.n_past >= self.n_ctx:
                    stopped = "context_full"
                    break
                stopping.check()
                with stage("llama.cpp", "writing the answer"):
                    self._decode_batches([tok], logits_last=True)
        finally:
            if grammar is not None:
                grammar.close()
        tail = decoder.decode(b"", final=guard is None)  # with a guard, only an unfinished character is left
        if tail:
            answer.append(tail)
            if on_text:
                on_text(tail)
        timings.decode_s += time.perf_counter() - t0
        return Generated("".join(answer), "".join(thinking), n, stopped, closed_early)

    def _text_bytes(self, tok: int, stop_at_eos: bool) -> bytes:
        """What `tok` adds to the answer's text: nothing for a thinking marker or the end."""
        if tok in self.think_ids or (stop_at_eos and self._lib.llama_vocab_is_eog(self.vocab, tok)):
            return b""
        return self._piece_bytes(tok)

    @staticmethod
    def _choose(logits: np.ndarray, temperature: float, rng: np.random.Generator,
                grammar: GrammarSampler | None) -> int | None:
        """The next token: greedy or sampled at `temperature`, among what the grammar allows (None: nothing)."""
        if grammar is not None:
            if temperature <= 0 and grammar.allows(best := int(np.argmax(logits))):
                return best
            logits = grammar.mask(logits)
            if not np.isfinite(logits).any():
                return None
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        return int(rng.choice(len(p), p=p / p.sum()))

    def _mtmd(self) -> MtmdContext:
        if self.mtmd is None:
            raise MedgemmaError("the vision encoder was already released")
        return self.mtmd

    def _onnx(self) -> OnnxVision:
        if self.vision_released or self.files.vision_onnx is None:
            raise MedgemmaError("the vision encoder was already released")
        if self.onnx_vision is None:
            with stage("ONNX Runtime", "loading the vision encoder"):
                self.onnx_vision = OnnxVision(self.files.vision_onnx, self._onnx_threads)
        return self.onnx_vision

    def release_vision(self) -> None:
        """Free the vision encoder (ONNX Runtime's session or libmtmd's projector) once no image will come:
        `ask` and `chat` encode all their images up front, so its memory is not held while answering."""
        if self.mtmd is not None:
            self.mtmd.close()
            self.mtmd = None
        if self.onnx_vision is not None:
            self.onnx_vision.close()
            self.onnx_vision = None
        self.vision_released = True

    def close(self) -> None:
        self.release_vision()
        self.llm.close()


def _abort_callback(lib: Any) -> Any:
    """ggml's abort callback: true once a stop was requested (see SLOW_NODES_TEST_ENV for what tests add)."""
    slow_ms = int(os.environ.get(SLOW_NODES_TEST_ENV, "0") or 0)
    usleep = ctypes.CDLL(None).usleep if slow_ms > 0 else None

    def aborted(_data: Any) -> bool:
        if usleep is not None:
            usleep(slow_ms * 1000)
        return bool(stopping.requested())

    return lib.ggml_abort_callback(aborted)


@dataclass
class Chunks:
    """A rendered prompt split at its images, ready for `Engine.prefill`."""
    parts: list[tuple[str, Any]]  # ("text", token ids) | ("image", n_tokens), in prompt order
    images: list[np.ndarray] = field(default_factory=list)  # the RGB images, in prompt order
    mtmd: MtmdChunks | None = None  # libmtmd's own copy, for prompts with images it split (None: split by us)
    embeddings: list[np.ndarray] | None = None  # the images' embeddings, when encoded before the model loaded

    @property
    def n_tokens(self) -> int:
        return sum(len(p) if kind == "text" else p for kind, p in self.parts)

    def free(self) -> None:
        if self.mtmd is not None:
            self.mtmd.free()
            self.mtmd = None
