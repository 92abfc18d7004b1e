"""MedGemma on llama.cpp: the model's own chat template, images through libmtmd, tokens streamed out.

We drive llama.cpp at the level of chunks (text tokens, image embeddings) rather than through
llama-cpp-python's chat handlers, so that we control exactly what the model sees (our square images,
the processor's "\\n\\n" around each image), can time image encoding apart from text, and can keep the KV
state of a prompt for follow-up questions.
"""

from __future__ import annotations

import codecs
import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_cli.containment import stage
from medgemma_cli.errors import InputError, MedgemmaError
from medgemma_cli.kernels.ggml import read_gguf_info
from medgemma_cli.llama_loader import load_llama
from medgemma_cli.native import quiet_stderr

THINK_OPEN, THINK_CLOSE = "<unused94>", "<unused95>"  # MedGemma 27B's thinking trace


@dataclass(frozen=True)
class ModelFiles:
    text: Path
    mmproj: Path | None
    name: str
    vision_onnx: Path | None = None

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
        return ModelFiles(model / "text.gguf", model / "mmproj.gguf" if "mmproj.gguf" in has else None, model.name,
                          model / "vision.onnx" if "vision.onnx" in has else None)
    if model.is_dir():
        raise InputError(model, "no text.gguf here (is this a folder written by `medgemma convert`?)")
    from medgemma_cli import store as _store

    named = _store.models_dir() / str(model)
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


class OnnxVision:
    """MedGemma's vision tower + projector on ONNX Runtime: RGB images → the embeddings mtmd would produce."""

    def __init__(self, path: Path, threads: int, mean: float = 0.5, std: float = 0.5):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.mean, self.std = mean, std

    def encode(self, rgb: np.ndarray) -> np.ndarray:
        """One H×W×3 uint8 image at the model's input size → [image tokens, text width] float32."""
        x = (rgb.astype(np.float32) / 255.0 - self.mean) / self.std
        px = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
        return np.ascontiguousarray(self.session.run(None, {"pixel_values": px})[0][0], dtype=np.float32)


VISION_BACKENDS = ("auto", "onnx", "mtmd")


@dataclass
class Timings:
    load_s: float = 0.0
    image_encode_s: float = 0.0
    prefill_s: float = 0.0  # images included
    image_decode_s: float = 0.0  # feeding ONNX-encoded embeddings to the text model
    first_token_s: float = 0.0  # from the start of prefill
    decode_s: float = 0.0


@dataclass
class Answer:
    text: str
    thinking: str
    prompt_tokens: int
    completion_tokens: int
    stopped: str  # eos | max_tokens
    timings: Timings = field(default_factory=Timings)


class Engine:
    """One text model (+ vision projector) loaded in llama.cpp, with a context of `n_ctx` tokens."""

    def __init__(self, files: ModelFiles, n_ctx: int = 4096, threads: int | None = None, gpu_layers: int | None = None,
                 verbose: bool = False, vision_backend: str = "auto"):
        import llama_cpp
        from llama_cpp import _logger

        _logger.set_verbose(verbose)
        self.files = files
        self.verbose = verbose
        t0 = time.perf_counter()
        threads = threads or _default_threads()
        if gpu_layers is None:
            gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
        self.gpu_layers = gpu_layers
        with stage("llama.cpp", "loading the model"), quiet_stderr(not verbose):
            self.llm = load_llama(files.text, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                                  n_threads_batch=threads, n_gpu_layers=gpu_layers, verbose=verbose)
        self._lib = llama_cpp
        self.ctx = self.llm._ctx.ctx
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self.n_ctx = n_ctx
        self.mtmd = None
        self._vision = None
        if files.mmproj is not None:
            from llama_cpp import mtmd_cpp

            from medgemma_cli.mtmd import MtmdVisionEncoder

            with stage("llama.cpp", "loading the vision projector"):
                self._vision = MtmdVisionEncoder(self.llm, files.mmproj, threads, use_gpu=gpu_layers != 0,
                                                 verbose=verbose)
            self.mtmd = self._vision.ctx
            self._m = mtmd_cpp
        self.onnx_vision = None
        self.vision_backend = "mtmd" if self.mtmd is not None else "none"
        if vision_backend not in VISION_BACKENDS:
            raise MedgemmaError(f"unknown vision backend {vision_backend!r}; "
                                f"choose one of {', '.join(VISION_BACKENDS)}")
        if self.mtmd is not None and vision_backend != "mtmd":
            # auto: ONNX Runtime int8 on CPU-only runs, libmtmd where the layers sit on a GPU (fast there)
            if vision_backend == "onnx" and files.vision_onnx is None:
                raise MedgemmaError(f"{files.text.parent}: no vision.onnx; convert with `--vision-onnx int8`, or use "
                                    "--vision-backend mtmd")
            if files.vision_onnx is not None and (vision_backend == "onnx" or gpu_layers == 0):
                with stage("ONNX Runtime", "loading the vision encoder"):
                    self.onnx_vision = OnnxVision(files.vision_onnx, threads)
                self.vision_backend = "onnx"
        self.load_s = time.perf_counter() - t0
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise InputError(files.text, "the GGUF has no chat template (tokenizer.chat_template)")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise MedgemmaError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(template)
        self.bos = self._piece(llama_cpp.llama_vocab_bos(self.vocab), special=True)
        self.think_ids = (self.token_id(THINK_OPEN), self.token_id(THINK_CLOSE))
        self.n_past = 0
        self.images_encoded = 0

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

    # --- prompts ------------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]]) -> str:
        return self.template.render(messages=messages, bos_token=self.bos, add_generation_prompt=True)

    def chunks(self, prompt: str, images: list[np.ndarray]) -> Chunks:
        """Split the rendered prompt at its images. Like the Hugging Face processor, each image is
        surrounded by a blank line; libmtmd adds <start_of_image> … <end_of_image> itself."""
        boi = "<start_of_image>"
        if prompt.count(boi) != len(images):
            raise MedgemmaError(f"the prompt has {prompt.count(boi)} image places for {len(images)} images")
        if images and self.mtmd is None:
            raise MedgemmaError(f"{self.files.text}: images need a vision projector (--mmproj)")
        if not images:
            return Chunks(self, None, [("text", self.tokenize(prompt))], [])
        m = self._m
        marker = m.mtmd_default_marker().decode()
        text = prompt.replace(boi, "\n\n" + marker + "\n\n")
        bitmaps = []
        keep = []
        for rgb in images:
            rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
            keep.append(rgb)
            bitmaps.append(m.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0],
                                              rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))))
        arr = (m.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
        raw = m.mtmd_input_chunks_init()
        inp = m.mtmd_input_text()
        encoded = text.encode("utf-8")
        inp.text, inp.text_len, inp.add_special, inp.parse_special = encoded, len(encoded), False, True
        with quiet_stderr(not self.verbose):  # libmtmd logs the whole prompt otherwise: notes included
            rc = m.mtmd_tokenize(self.mtmd, raw, ctypes.byref(inp), arr, len(bitmaps))
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
        return Chunks(self, raw, parts, keep)

    # --- running ------------------------------------------------------------------------------------
    def reset(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def rewind(self, n_past: int) -> None:
        """Forget everything after position `n_past` (the images and notes before it stay)."""
        if not self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self.ctx), 0, n_past, -1):
            raise MedgemmaError("llama.cpp could not cut the context back (this cache type cannot)")
        self.n_past = n_past

    def decode_text(self, text: str, tokens: list[int] | None = None) -> None:
        self._decode_tokens(tokens if tokens is not None else self.tokenize(text), logits_last=True)

    def prefill(self, chunks: Chunks, timings: Timings, logits_last: bool = True) -> None:
        """Decode the prompt (text and image chunks) after what is already in the context."""
        if self.n_past + chunks.n_tokens > self.n_ctx:
            raise MedgemmaError(f"the prompt needs {self.n_past + chunks.n_tokens} tokens "
                                f"but the context holds {self.n_ctx}")
        t0 = time.perf_counter()
        if chunks.raw is None:
            self._decode_tokens(chunks.parts[0][1], logits_last=logits_last)
        else:
            m = self._m
            last = m.mtmd_input_chunks_size(chunks.raw) - 1
            image_index = 0
            for i in range(last + 1):
                c = m.mtmd_input_chunks_get(chunks.raw, i)
                is_image = m.mtmd_input_chunk_get_type(c) != m.MTMD_INPUT_CHUNK_TYPE_TEXT
                t1 = time.perf_counter()
                new_n_past = self._lib.llama_pos(self.n_past)  # the helper adds to it for text chunks
                if is_image and self.onnx_vision is not None:
                    with stage("ONNX Runtime", f"encoding image {image_index + 1}"):
                        embd = self.onnx_vision.encode(chunks.images[image_index])
                    timings.image_encode_s += time.perf_counter() - t1
                    t1 = time.perf_counter()
                    ptr = embd.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                    # a NULL callback: ctypes takes None for NULL, which typeshed's cast() leaves out
                    no_callback = ctypes.cast(None, m.mtmd_helper_post_decode_callback)  # type: ignore[arg-type]
                    with stage("llama.cpp", "reading the prompt"), quiet_stderr(not self.verbose):
                        rc = m.mtmd_helper_decode_image_chunk(self.mtmd, self.ctx, c, ptr, self.n_past, 0, 512,
                                                              ctypes.byref(new_n_past),
                                                              no_callback, None)
                    timings.image_decode_s += time.perf_counter() - t1
                    is_image = False  # encode time is already counted
                else:
                    doing = f"encoding image {image_index + 1}" if is_image else "reading the prompt"
                    with stage("llama.cpp", doing), quiet_stderr(not self.verbose):
                        rc = m.mtmd_helper_eval_chunk_single(self.mtmd, self.ctx, c, self.n_past, 0, 512,
                                                             logits_last and i == last, ctypes.byref(new_n_past))
                if m.mtmd_input_chunk_get_type(c) != m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    image_index += 1
                    self.images_encoded += 1
                if rc != 0:
                    raise MedgemmaError(f"llama.cpp failed to evaluate prompt chunk {i} (code {rc})")
                self.n_past = new_n_past.value
                if is_image:
                    timings.image_encode_s += time.perf_counter() - t1
        timings.prefill_s += time.perf_counter() - t0

    def _decode_tokens(self, tokens: list[int], logits_last: bool) -> None:
        with stage("llama.cpp", "reading the prompt" if len(tokens) > 1 else "writing the answer"):
            self._decode_batches(tokens, logits_last)

    def _decode_batches(self, tokens: list[int], logits_last: bool) -> None:
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
                 started: float | None = None, stop_at_eos: bool = True) -> tuple[str, str, int, str]:
        """Sample after the prefilled prompt; stream visible text. Returns (answer, thinking, tokens, why stopped)."""
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
        n = 0
        for n in range(1, max_tokens + 1):
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, -1), shape=(n_vocab,))
            if temperature <= 0:
                tok = int(np.argmax(logits))
            else:
                z = logits.astype(np.float64) / temperature
                p = np.exp(z - z.max())
                tok = int(rng.choice(n_vocab, p=p / p.sum()))
            if n == 1:
                timings.first_token_s = time.perf_counter() - started
            if stop_at_eos and lib.llama_vocab_is_eog(self.vocab, tok):
                stopped = "eos"
                n -= 1
                break
            if tok == self.think_ids[0] and self.think_ids[0] is not None:
                in_thought = True
            elif tok == self.think_ids[1] and self.think_ids[1] is not None:
                in_thought = False
            else:
                text = decoder.decode(self._piece_bytes(tok))
                (thinking if in_thought else answer).append(text)
                if on_text and text and (show_thinking or not in_thought):
                    on_text(text)
            if self.n_past >= self.n_ctx:
                stopped = "context_full"
                break
            with stage("llama.cpp", "writing the answer"):
                self._decode_batches([tok], logits_last=True)
        tail = decoder.decode(b"", final=True)
        if tail:
            answer.append(tail)
            if on_text:
                on_text(tail)
        timings.decode_s += time.perf_counter() - t0
        return "".join(answer), "".join(thinking), n, stopped

    def close(self) -> None:
        if self._vision is not None:
            self._vision.close()
            self._vision = self.mtmd = None
        self.llm.close()


@dataclass
class Chunks:
    engine: Engine
    raw: Any  # mtmd_input_chunks pointer, or None for text-only prompts
    parts: list[tuple[str, Any]]  # ("text", token ids) | ("image", n_tokens)
    images: list[np.ndarray] = field(default_factory=list)  # the RGB images, in chunk order

    @property
    def n_tokens(self) -> int:
        return sum(len(p) if kind == "text" else p for kind, p in self.parts)

    def free(self) -> None:
        if self.raw is not None:
            self.engine._m.mtmd_input_chunks_free(self.raw)
            self.raw = None


def _default_threads() -> int:
    from medgemma_cli.machine import physical_cores

    return physical_cores()
