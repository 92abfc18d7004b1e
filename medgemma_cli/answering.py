"""`medgemma ask`: one question about local files, answered by MedGemma on this machine."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medgemma_cli.defaults import (
    DEFAULT_CACHE_GB,
    DEFAULT_KV_TYPE,
    DEFAULT_MAGNIFICATION,
    DEFAULT_MAX_TOKENS,
    MAX_PAGES,
    MAX_PATCHES,
)
from medgemma_cli.errors import MedgemmaError
from medgemma_cli.estimate import Estimate, Speeds, estimate, known_speeds, remember, speeds_key
from medgemma_cli.inputs import dicom
from medgemma_cli.inputs.collect import Collected, collect, combine_studies
from medgemma_cli.inputs.images import save_png
from medgemma_cli.llama.caches import (
    EmbeddingCache,
    PromptCache,
    context_identity,
    open_cache,
    vision_file,
    vision_identity,
)
from medgemma_cli.llama.engine import Engine, Timings
from medgemma_cli.llama.grammar import Constraint, json_answer, max_chars
from medgemma_cli.llama.memory import MemoryEstimate, check_memory, estimate_memory
from medgemma_cli.llama.model_files import ModelFiles, resolve_model, vision_backend_for
from medgemma_cli.llama.session import PrefixSession, Turn, prefix_messages
from medgemma_cli.machine import physical_cores
from medgemma_cli.native import quiet_stderr
from medgemma_cli.progress import AskProgress
from medgemma_cli.prompt import build_messages, truncate_notes
from medgemma_cli.recipes import token_budget, with_thinking

NOTE_BYTES_PER_TOKEN = 8  # above what any text costs a Gemma token (CJK: ~3 bytes a character, ~1.5 a token)


@dataclass
class AskOptions:
    system: str | None = None
    max_tokens: int | None = None  # None: DEFAULT_MAX_TOKENS, or the thinking recipe's budget with `think`
    temperature: float = 0.0
    seed: int = 0
    threads: int | None = None
    gpu_layers: int | None = None
    ctx: int | None = None
    with_metadata: bool = False
    show_thinking: bool = False
    max_slices: int = dicom.MAX_SLICES
    save_input: Path | None = None
    verbose: bool = False
    vision_backend: str = "auto"  # auto: ONNX Runtime on CPU-only runs when vision.onnx exists, else libmtmd
    include_phi: bool = False  # leave the patient's identifiers in notes and SR text (replaced otherwise)
    magnification: str = DEFAULT_MAGNIFICATION  # whole slides: the level read (5x, 10x, 20x)
    max_patches: int = MAX_PATCHES  # whole slides: tissue patches sent, in all
    on_wait: Callable[[str], None] | None = None  # told the expected wait (many images) before the model starts
    think: bool = False  # MedGemma 1.5's thinking switch (recipes.with_thinking); the trace is kept apart
    schema: dict[str, Any] | None = None  # the answer is JSON valid under this schema (constrained sampling)
    constraint: Constraint | None = None  # or any grammar (locate's, tests'); wins over `schema`
    prior: list[Path] = field(default_factory=list)  # an earlier study, sent before the current one
    label_timepoints: bool = False  # "Prior study:" / "Current study:" before each study's images
    pad_square: bool = False  # zero-pad each image to a centred square before the resize (locate's recipe)
    kv_type: str = DEFAULT_KV_TYPE  # f16 (llama.cpp's default) | q8_0 (half the cache, flash attention)
    memory_check: bool = True  # refuse when the expected peak memory exceeds what the machine has available
    on_estimate: Callable[[MemoryEstimate], None] | None = None  # told the expected peak before the model loads
    cache: bool = True  # reuse (and keep) image embeddings and prompt states in the store's cache
    cache_gb: float = DEFAULT_CACHE_GB  # the most the cache folder may hold; least recently used entries go

    def budget(self, images: bool) -> int:
        """The longest answer: --max-tokens, else the recipe's (larger with thinking, larger still text-only)."""
        return token_budget(self.max_tokens, self.think, images, DEFAULT_MAX_TOKENS)

    def system_text(self) -> str | None:
        return with_thinking(self.system) if self.think else self.system

    def answer_constraint(self, images: bool) -> Constraint | None:
        if self.constraint is not None:
            return self.constraint
        if self.schema is None:
            return None
        budget = self.budget(images)
        return json_answer(self.schema, self.think, reserve=min(budget // 2, max_chars(self.schema) or budget // 2))


@dataclass
class AskResult:
    answer: str
    thinking: str | None
    model: dict[str, Any]
    inputs: list[dict[str, Any]]
    images_sent: int
    warnings: list[str]
    tokens: dict[str, int]
    timings: dict[str, float]
    stopped: str
    saved_inputs: list[str] = field(default_factory=list)
    identifiers_removed: int = 0  # patient identifiers replaced by [NAME], [ID], [DATE], [INSTITUTION]
    parsed: Any = None  # with a schema: the answer as JSON (None if it did not parse; `parse_error` says why)
    parse_error: str | None = None
    memory: dict[str, Any] = field(default_factory=dict)  # the expected peak, by component (bytes)
    cache: dict[str, Any] = field(default_factory=dict)  # what came from the cache instead of being computed
    estimate: dict[str, Any] | None = None  # the wait said before the work (None: no earlier run to go by)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ContextFit:
    """The notes as they will be sent (truncated visibly if they had to be) and the context that holds them."""
    notes: list[tuple[str, str]]
    n_ctx: int
    warnings: list[str]
    prompt_tokens: int = 0  # what the prompt itself takes (the answer's budget left out)


@dataclass
class _Prepared:
    model: ModelFiles
    inputs: Collected
    fit: ContextFit
    memory: MemoryEstimate | None = None


@dataclass
class Conversation:
    """A model loaded and the inputs encoded once (`open_session`): ask with `session`, then `close()`."""
    session: PrefixSession
    model: ModelFiles
    warnings: list[str]  # from planning the context (the inputs' own are in session.inputs.warnings)
    saved_inputs: list[str] = field(default_factory=list)
    max_tokens: int = DEFAULT_MAX_TOKENS  # the answer budget the context was planned for
    memory: MemoryEstimate | None = None
    estimate: Estimate | None = None  # the wait said before the work, from this machine's earlier runs

    def close(self) -> None:
        self.session.engine.close()


class TokenCounter:
    """Exact token counts before the model is loaded, with the model's own vocabulary (loads in a blink)."""

    def __init__(self, files: ModelFiles):
        from medgemma_cli.llama.loader import load_llama

        with quiet_stderr():
            self.llm = load_llama(files.text, vocab_only=True, verbose=False)
        arch = self.llm.metadata.get("general.architecture", "gemma3")
        self.n_ctx_train = int(self.llm.metadata.get(f"{arch}.context_length", 8192))

    def count(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


def plan_context(question: str, inputs: Collected, files: ModelFiles, opts: AskOptions,
                 counter: TokenCounter, image_tokens: int) -> ContextFit:
    """Notes and a context size that fit: notes are truncated visibly if they must be."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    warnings: list[str] = []
    max_tokens = opts.budget(bool(inputs.images))
    limit = min(opts.ctx or counter.n_ctx_train, counter.n_ctx_train)
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
        counter.llm.metadata.get("tokenizer.chat_template") or "")
    per_image = image_tokens + 2  # <start_of_image> and <end_of_image> around the embeddings

    def need(notes: list[tuple[str, str]]) -> int:
        msgs = build_messages(question, inputs, opts.system_text(), opts.with_metadata, notes)
        text = template.render(messages=msgs, bos_token="<bos>", add_generation_prompt=True,
                               raise_exception=lambda m: None)
        text = text.replace("<start_of_image>", "\n\n\n\n")
        return counter.count(text) + per_image * len(inputs.images) + max_tokens

    notes = list(inputs.notes)
    needed = need(notes)
    if needed > limit and notes:
        total = sum(len(t) for _, t in notes)
        lo, hi = 0, total
        while lo < hi:  # the longest prefix of the notes that fits
            mid = (lo + hi + 1) // 2
            if need(truncate_notes(notes, mid)[0]) <= limit:
                lo = mid
            else:
                hi = mid - 1
        notes, cut = truncate_notes(notes, lo)
        warnings.append(f"the notes did not fit the context of {limit} tokens: {cut} characters were left out "
                        "(marked in the prompt)")
        needed = need(notes)
    if needed > limit:
        raise MedgemmaError(f"the prompt needs {needed} tokens ({len(inputs.images)} images × {per_image}, the text, "
                            f"{max_tokens} to answer) but the context holds {limit}; send fewer images "
                            "(--max-slices), lower --max-tokens or raise --ctx")
    n_ctx = min(limit, max(256, -(-needed // 256) * 256))
    return ContextFit(notes, n_ctx, warnings, needed - max_tokens)


# Measured by benchmarks/ask_4b.py and vision_4b.py on the 4B shape (AMD EPYC, 2 threads, 2 cores): seconds to
# encode one image (ONNX Runtime int8 / libmtmd) and prompt tokens prefilled per second. Scaled by threads.
ENCODE_S_PER_IMAGE = {"onnx": 22.0, "mtmd": 48.0}
PREFILL_TOKENS_PER_S = 38.1
MEASURED_THREADS = 2


def estimate_wait(images: int, per_image: int, files: ModelFiles, opts: AskOptions) -> str:
    """A rough time before the first answer token on this machine, from the benchmarks' figures: the image
    encoder, then the prefill of every image's tokens (a 125-patch slide is ~33K tokens)."""
    from medgemma_cli.machine import physical_cores

    backend = "onnx" if vision_backend_for(files, opts.vision_backend, opts.gpu_layers) == "onnx" else "mtmd"
    threads = opts.threads or physical_cores()
    scale = MEASURED_THREADS / max(1, threads)
    seconds = images * (ENCODE_S_PER_IMAGE[backend] + per_image / PREFILL_TOKENS_PER_S) * scale
    wait = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
    return (f"{images} images (~{images * per_image:,} tokens): about {wait} to encode and read on "
            f"{threads} CPU thread(s) with the 4B model (from the benchmarks' 2-core figures; a GPU is much faster)")


def _measured_speeds(files: ModelFiles, opts: AskOptions) -> Speeds | None:
    """This machine's speeds for the model, encoder and threads, if an earlier run measured them."""
    backend = vision_backend_for(files, opts.vision_backend, opts.gpu_layers)
    return known_speeds(speeds_key(files.text, vision_file(files, backend), backend, opts.threads or physical_cores()))


def _prepare(question: str, files: list[Path] | None, model: Path | None, gguf: Path | None, mmproj: Path | None,
             opts: AskOptions, extra_tokens: int = 0, reuse: bool = True) -> _Prepared:
    if not question.strip():
        raise MedgemmaError("the question is empty")
    model_files = resolve_model(model, gguf, mmproj)
    vision = model_files.vision
    counter = TokenCounter(model_files)
    limit = min(opts.ctx or counter.n_ctx_train, counter.n_ctx_train)
    note_bytes = limit * NOTE_BYTES_PER_TOKEN  # read no more of a note than the context could hold
    image_size = vision["image_size"] if vision else None
    image_tokens = vision["image_tokens"] if vision else 0
    # each slice costs its embeddings, <start_of_image>/<end_of_image>, the blank lines and its label
    per_image = image_tokens + 2 + counter.count("\n\nSLICE 85\n\n")
    extra_tokens = min(extra_tokens, limit // 2)  # room kept for a conversation's later turns
    # slide patches are read one by one at a cost: never more than the context could hold, notes aside
    patches_that_fit = max(1, (limit - opts.budget(True) - counter.count(question) - 64 - extra_tokens) // per_image)
    max_patches = min(opts.max_patches, patches_that_fit) if image_tokens else opts.max_patches

    def gather(max_slices: int, max_patches: int, max_pages: int = MAX_PAGES) -> Collected:
        return _collect(files, opts, image_size, max_slices, note_bytes, max_patches, max_pages)

    inputs = gather(opts.max_slices, max_patches)
    tissue = sum(len(s.plan.cells) for s in inputs.slides)
    if inputs.slides and max_patches < opts.max_patches and tissue > max_patches:
        inputs.warnings.append(f"a context of {limit} tokens holds {max_patches} slide patches, not {opts.max_patches} "
                               "(--ctx raises it)")
    text_tokens = counter.count(question + "".join(t for _, t in inputs.notes)) + 64 + extra_tokens
    room = limit - opts.budget(True) - text_tokens
    pages = any(r.kind in ("document", "dicom-pdf") for r in inputs.records)
    if inputs.images and len(inputs.images) * per_image > room and (inputs.volumes or inputs.slides or pages):
        images_that_fit = max(1, room // per_image)
        before = len(inputs.images)
        inputs = gather(min(opts.max_slices, images_that_fit), min(max_patches, images_that_fit),
                        min(MAX_PAGES, images_that_fit))
        noun = "slices" if inputs.volumes else "slide patches" if inputs.slides else "pages"
        how = "the first ones" if noun == "pages" else "sampled evenly"
        inputs.warnings.append(f"too many images for a context of {limit} tokens: {len(inputs.images)} of "
                               f"{before} {noun} sent, {how}")
    if opts.on_wait is not None and len(inputs.images) > 1 and _measured_speeds(model_files, opts) is None:
        # this machine has not run the model yet: the benchmarks' figures (its own, once measured, come later)
        opts.on_wait(estimate_wait(len(inputs.images), per_image, model_files, opts))
    opts_for_plan = AskOptions(**{**opts.__dict__, "max_tokens": opts.budget(bool(inputs.images)) + extra_tokens})
    fit = plan_context(question, inputs, model_files, opts_for_plan, counter, image_tokens)
    if extra_tokens:
        fit.n_ctx = limit  # a conversation gets the whole context it was given
    memory = estimate_memory(model_files, fit.n_ctx, len(inputs.images), kv_type=opts.kv_type, swa_full=reuse,
                             vision_backend=opts.vision_backend, gpu_layers=opts.gpu_layers, encode_first=True)
    if opts.on_estimate is not None:
        opts.on_estimate(memory)
    if opts.memory_check:
        check_memory(memory)
    if opts.save_input is not None:
        opts.save_input.mkdir(parents=True, exist_ok=True)
    return _Prepared(model_files, inputs, fit, memory)


def _collect(files: list[Path] | None, opts: AskOptions, image_size: int | None, max_slices: int,
             note_bytes: int, max_patches: int = MAX_PATCHES, max_pages: int = MAX_PAGES) -> Collected:
    """The current study's inputs, after the prior study's (`opts.prior`) when there is one."""
    def one(paths: list[Path] | None, slices: int) -> Collected:
        return collect([Path(f) for f in paths or []], image_size, slices, scrub_identifiers=not opts.include_phi,
                       note_bytes=note_bytes, pad_square=opts.pad_square, magnification=opts.magnification,
                       max_patches=max_patches, max_pages=max_pages)

    if not opts.prior:
        return one(files, max_slices)
    if not files:
        raise MedgemmaError("--prior needs the current study too")
    half = max(1, max_slices // 2)  # the two studies share the slice budget
    return combine_studies(one(opts.prior, half), one(files, half), opts.label_timepoints)


def _result(conversation: Conversation, turn: Turn, prefill: Timings, opts: AskOptions, t_start: float
            ) -> AskResult:
    model_files, engine, inputs = conversation.model, conversation.session.engine, conversation.session.inputs
    t = turn.timings
    return AskResult(
        answer=turn.answer,
        thinking=turn.thinking if opts.show_thinking else None,
        model={"name": model_files.name, "text": str(model_files.text),
               "mmproj": str(model_files.mmproj) if model_files.mmproj else None, "n_ctx": engine.n_ctx,
               "gpu_layers": engine.gpu_layers, "vision_backend": engine.vision_backend,
               "kv_type": engine.kv_type, "swa_full": engine.swa_full},
        inputs=[{"path": str(r.path), "sha256": r.sha256, "kind": r.kind, "rendering": r.detail}
                for r in inputs.records],
        images_sent=len(inputs.images),
        warnings=inputs.warnings + conversation.warnings,
        tokens={"prompt": turn.prompt_tokens, "completion": turn.completion_tokens},
        timings={"load_s": round(engine.load_s, 3), "image_encode_s": round(prefill.image_encode_s, 3),
                 "prefill_s": round(prefill.prefill_s + t.prefill_s, 3),
                 "first_token_s": round(prefill.first_token_s + t.first_token_s, 3),
                 "decode_s": round(t.decode_s, 3),
                 "decode_tokens_per_s": (round(turn.completion_tokens / t.decode_s, 2)
                                         if t.decode_s and turn.completion_tokens else 0.0),
                 "total_s": round(time.perf_counter() - t_start, 3)},
        stopped=turn.stopped,
        saved_inputs=conversation.saved_inputs,
        identifiers_removed=inputs.identifiers_removed,
        **_parsed(turn, opts),
        memory=conversation.memory.as_dict() if conversation.memory else {},
        cache={"images_from_cache": engine.embedding_cache.hits if engine.embedding_cache else 0,
               "images_encoded": engine.images_encoded, "prompt_restored": conversation.session.restored},
        estimate=conversation.estimate.as_dict() if conversation.estimate else None,
    )


def _parsed(turn: Turn, opts: AskOptions) -> dict[str, Any]:
    """With a schema, the answer read as JSON; a cut or stray answer is said, never patched up."""
    if opts.schema is None or opts.constraint is not None:
        return {}
    try:
        return {"parsed": json.loads(turn.answer)}
    except json.JSONDecodeError as e:
        why = f"stopped at {turn.stopped}" if turn.stopped != "eos" else str(e)
        return {"parse_error": f"the answer is not complete JSON ({why})"}


def _save_inputs(inputs: Collected, folder: Path | None) -> list[str]:
    saved = []
    if folder is not None:
        for i, img in enumerate(inputs.images, 1):
            path = folder / f"input-{i:03d}.png"
            save_png(img.rgb, path)
            saved.append(str(path))
    return saved


def open_session(question_hint: str, files: list[Path] | None, *, model: Path | None = None, gguf: Path | None = None,
                 mmproj: Path | None = None, options: AskOptions | None = None, extra_tokens: int = 0,
                 reuse: bool = True, progress: AskProgress | None = None) -> Conversation:
    """Load the model and encode the inputs once; answer questions with the returned session.

    `reuse=False` is for one question only: the sliding-window layers then keep only their window (far less
    memory on long prompts, the same answer), which rules out going back to the prefix for another question.
    Before any work, `progress` is told this machine's estimate of the wait (images to encode, prompt to read),
    then each image as it is encoded. The store's cache (unless `options.cache` is off) gives back what an
    earlier run about the same inputs computed: the context after them, or their images' embeddings."""
    opts = options or AskOptions()
    plan = _prepare(question_hint, files, model, gguf, mmproj, opts, extra_tokens, reuse)
    saved = _save_inputs(plan.inputs, opts.save_input)
    images = [img.rgb for img in plan.inputs.images]
    backend = vision_backend_for(plan.model, opts.vision_backend, opts.gpu_layers)
    threads = opts.threads or physical_cores()
    cache = open_cache(opts.cache_gb) if opts.cache else None
    # a saved context holds the prompt's text: never one with the identifiers --include-phi left in it
    prompts = (PromptCache(cache, context_identity(plan.model, backend, opts.kv_type, reuse))
               if cache is not None and not opts.include_phi else None)
    restorable = prompts is not None and prompts.has(
        prompts.key(prefix_messages(plan.inputs, opts.system_text(), opts.with_metadata, plan.fit.notes), images))
    embedding_cache = (EmbeddingCache(cache, vision_identity(plan.model, backend))
                       if cache is not None and backend != "none" else None)
    to_encode = 0 if restorable else len(images) - (sum(map(embedding_cache.has, images)) if embedding_cache else 0)
    speeds_at = speeds_key(plan.model.text, vision_file(plan.model, backend), backend, threads)
    speeds = known_speeds(speeds_at)
    waiting = None
    if speeds is not None and not restorable:
        image_tokens = plan.model.vision["image_tokens"] if plan.model.vision else 0
        slices = max((len(v.slices) for v in plan.inputs.volumes if v.is_volume), default=0)
        waiting = estimate(speeds, to_encode, plan.fit.prompt_tokens, image_tokens, slices, sent=len(images))
    if waiting is not None and opts.on_wait is not None:
        opts.on_wait(waiting.line())
    if progress is not None:
        progress.planned(waiting, to_encode)
    embeddings, encode_s, fresh = None, 0.0, 0
    if images and not restorable and backend == "onnx" and plan.model.vision_onnx is not None:
        from medgemma_cli.llama.onnx_vision import encode_first

        t0 = time.perf_counter()
        embeddings, fresh = encode_first(plan.model.vision_onnx, images, threads, embedding_cache,
                                         progress.image if progress is not None else None)
        encode_s = time.perf_counter() - t0
    engine = Engine(plan.model, n_ctx=plan.fit.n_ctx, threads=opts.threads, gpu_layers=opts.gpu_layers,
                    verbose=opts.verbose, vision_backend=opts.vision_backend, kv_type=opts.kv_type, swa_full=reuse,
                    cache=cache)
    if embeddings is not None:  # what encode_first did counts as this engine's prompt
        engine.images_encoded += fresh
        if engine.embedding_cache is not None:
            engine.embedding_cache.hits += len(images) - fresh
    session = PrefixSession(engine, plan.inputs, opts.system_text(), opts.with_metadata, plan.fit.notes,
                            embeddings=embeddings, prompt_cache=prompts)
    conversation = Conversation(session, plan.model, plan.fit.warnings, saved, opts.budget(bool(images)),
                                plan.memory, waiting)
    try:
        session.start(progress.image if progress is not None and embeddings is None else None)
    except BaseException:
        engine.close()
        raise
    t = session.prefill_timings  # the images encoded before the model loaded count as part of the prompt
    t.image_encode_s, t.prefill_s, t.first_token_s = (t.image_encode_s + encode_s, t.prefill_s + encode_s,
                                                      t.first_token_s + encode_s)
    if not session.restored:  # this machine's speeds, for the next estimate
        remember(speeds_at, engine.images_encoded, t.image_encode_s, session.prefix_tokens,
                 t.prefill_s - t.image_encode_s)
    engine.release_vision()  # every image is in the context now; the encoder's memory is not needed to answer
    return conversation


def ask(question: str, files: list[Path] | None = None, *, model: Path | None = None, gguf: Path | None = None,
        mmproj: Path | None = None, options: AskOptions | None = None,
        on_text: Callable[[str], None] | None = None, progress: AskProgress | None = None) -> AskResult:
    """Answer a question about DICOM files, series, images and notes with MedGemma (streamed to `on_text`)."""
    return ask_many([question], files, model=model, gguf=gguf, mmproj=mmproj, options=options, on_text=on_text,
                    progress=progress)[0]


def ask_many(questions: list[str], files: list[Path] | None = None, *, model: Path | None = None,
             gguf: Path | None = None, mmproj: Path | None = None, options: AskOptions | None = None,
             on_text: Callable[[str], None] | None = None, progress: AskProgress | None = None
             ) -> list[AskResult]:
    """Several independent questions about the same inputs: images and notes are encoded once, and each
    question starts again from that state (the same answers, token for token, as separate `ask`s)."""
    opts = options or AskOptions()
    if not questions:
        raise MedgemmaError("no question given")
    t_start = time.perf_counter()
    longest = max(questions, key=len)
    conversation = open_session(longest, files, model=model, gguf=gguf, mmproj=mmproj, options=opts,
                                reuse=len(questions) > 1, progress=progress)
    session = conversation.session
    results: list[AskResult] = []
    try:
        for q in questions:
            if not q.strip():
                raise MedgemmaError("the question is empty")
            turn = session.ask(q, conversation.max_tokens, opts.temperature, opts.seed, opts.show_thinking, on_text,
                               constraint=opts.answer_constraint(bool(session.inputs.images)))
            first = not results
            results.append(_result(conversation, turn, session.prefill_timings if first else Timings(), opts,
                                   t_start))
    finally:
        conversation.close()
    return results
