"""Images and notes encoded once, questions answered from that state: `ask`, several questions, and `chat`.

The prompt is split at the question: everything before it (the turn start, notes, images with their labels)
is prefilled once; for each question the KV cache is cut back to that point and only the question and the
turn markers after it are decoded. A single `ask` goes through the same split, so answering from a reused
state is token for token what answering from scratch gives.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from medgemma_cli.errors import MedgemmaError
from medgemma_cli.inputs.collect import Collected
from medgemma_cli.llama.caches import PromptCache
from medgemma_cli.llama.engine import Engine, Timings
from medgemma_cli.llama.grammar import Constraint
from medgemma_cli.prompt import build_messages

_QUESTION = "\x00QUESTION\x00"
TURN_END, USER_TURN, MODEL_TURN = "<end_of_turn>\n", "<start_of_turn>user\n", "<start_of_turn>model\n"


def prefix_messages(inputs: Collected, system: str | None, with_metadata: bool,
                    notes: list[tuple[str, str]] | None) -> list[dict[str, Any]]:
    """The prompt's messages with a placeholder where the question goes: what is encoded once, and what the prompt
    cache is keyed by (with the images' pixels)."""
    return build_messages(_QUESTION, inputs, system, with_metadata, notes)


@dataclass
class Turn:
    question: str
    answer: str
    thinking: str
    prompt_tokens: int
    completion_tokens: int
    stopped: str
    timings: Timings
    closed_early: bool = False  # the grammar cut thinking/reasoning short to leave room for the JSON


@dataclass
class PrefixSession:
    engine: Engine
    inputs: Collected
    system: str | None = None
    with_metadata: bool = False
    notes: list[tuple[str, str]] | None = None
    prefix_tokens: int = 0
    suffix: str = ""
    history: list[Turn] = field(default_factory=list)
    prefill_timings: Timings = field(default_factory=Timings)
    dropped_turns: int = 0
    embeddings: list[Any] | None = None  # the images' embeddings if encoded before the model loaded (else here)
    prompt_cache: PromptCache | None = None  # the context after the prefix, saved for (and loaded by) later runs
    restored: bool = False  # the prefix came from the prompt cache: nothing was encoded or read

    def start(self, on_image: Callable[[int, int], None] | None = None) -> None:
        """Render the prompt around a placeholder question and prefill everything before it (or load it from the
        prompt cache); `on_image(done, total)` after each image the engine encodes."""
        messages = prefix_messages(self.inputs, self.system, self.with_metadata, self.notes)
        rendered = self.engine.render(messages)
        if rendered.count(_QUESTION) != 1:
            raise MedgemmaError("the chat template does not place the question where expected")
        prefix, self.suffix = rendered.split(_QUESTION)
        self.engine.reset()
        images = [img.rgb for img in self.inputs.images]
        chunks = self.engine.chunks(prefix, images, self.embeddings)
        self.embeddings = None  # in the context from here on
        key = self.prompt_cache.key(messages, images) if self.prompt_cache is not None else None
        try:
            t0 = time.perf_counter()
            if key is not None and self.prompt_cache is not None:
                self.restored = self.prompt_cache.restore(self.engine, key, chunks.n_tokens)
            if not self.restored:
                self.engine.prefill(chunks, self.prefill_timings, logits_last=False, on_image=on_image)
            self.prefill_timings.first_token_s = time.perf_counter() - t0
        finally:
            chunks.free()
        self.prefix_tokens = self.engine.n_past
        if key is not None and self.prompt_cache is not None and not self.restored:
            self.prompt_cache.save(self.engine, key)

    def ask(self, question: str, max_tokens: int, temperature: float = 0.0, seed: int = 0,
            show_thinking: bool = False, on_text: Callable[[str], None] | None = None,
            constraint: Constraint | None = None) -> Turn:
        """A fresh question about the same inputs: the state goes back to just after the images."""
        self.engine.rewind(self.prefix_tokens)
        return self._turn(question.strip() + self.suffix, question, max_tokens, temperature, seed, show_thinking,
                          on_text, keep=False, constraint=constraint)

    def follow_up(self, question: str, max_tokens: int, temperature: float = 0.0, seed: int = 0,
                  show_thinking: bool = False, on_text: Callable[[str], None] | None = None,
                  on_notice: Callable[[str], None] | None = None) -> Turn:
        """The next turn of a conversation; the oldest turns go (visibly) when the context would overflow."""
        text = self._turn_text(len(self.history), question)
        need = len(self.engine.tokenize(text)) + max_tokens
        if self.engine.n_past + need > self.engine.n_ctx:
            self._drop_old_turns(question, max_tokens, on_notice)
            text = self._turn_text(len(self.history), question)
        return self._turn(text, question, max_tokens, temperature, seed, show_thinking, on_text, keep=True)

    def _turn_text(self, index: int, question: str) -> str:
        """The first question continues the user turn that holds the images; later ones open their own."""
        if index == 0:
            return question.strip() + self.suffix
        return TURN_END + USER_TURN + question.strip() + TURN_END + MODEL_TURN

    def _replay_text(self, turns: list[Turn] | None = None) -> str:
        turns = self.history if turns is None else turns
        return "".join(self._turn_text(i, t.question) + t.answer for i, t in enumerate(turns))

    def _drop_old_turns(self, question: str, max_tokens: int, on_notice: Callable[[str], None] | None) -> None:
        """Nothing changes when even the question alone does not fit: the conversation goes on as it was."""
        def fits(turns: list[Turn]) -> bool:
            text = self._replay_text(turns) + self._turn_text(len(turns), question)
            return self.prefix_tokens + len(self.engine.tokenize(text)) + max_tokens <= self.engine.n_ctx

        kept = list(self.history)
        while kept and not fits(kept):
            kept.pop(0)
        if not fits(kept):
            raise MedgemmaError("the question does not fit in the context even without earlier turns; "
                                "ask a shorter one, lower --max-tokens or raise --ctx")
        self.dropped_turns += len(self.history) - len(kept)
        self.history = kept
        self.engine.rewind(self.prefix_tokens)
        if self.history:
            self.engine.decode_text(self._replay_text())
        if on_notice:
            on_notice(f"older turns dropped to fit the context ({self.dropped_turns} so far); the images stay")

    def _turn(self, text: str, question: str, max_tokens: int, temperature: float, seed: int, show_thinking: bool,
              on_text: Callable[[str], None] | None, keep: bool, constraint: Constraint | None = None) -> Turn:
        timings = Timings()
        tokens = self.engine.tokenize(text)
        if self.engine.n_past + len(tokens) + max_tokens > self.engine.n_ctx:
            raise MedgemmaError(f"the question needs {len(tokens) + max_tokens} more tokens than the context has left")
        started = time.perf_counter()
        self.engine.decode_text(text, tokens=tokens)
        timings.prefill_s = time.perf_counter() - started
        out = self.engine.generate(max_tokens, temperature, seed, show_thinking, on_text, timings, started,
                                   constraint=constraint)
        turn = Turn(question, out.text.strip(), out.thinking.strip(), self.prefix_tokens + len(tokens), out.tokens,
                    out.stopped, timings, out.closed_early)
        if keep:
            self.history.append(turn)
        return turn

    def transcript(self) -> dict[str, Any]:
        """Questions and answers, and what the inputs were (kinds and SHA-256, no paths, no DICOM tags)."""
        return {"inputs": [{"kind": r.kind, "sha256": r.sha256, "rendering": r.detail} for r in self.inputs.records],
                "image_encodings": self.engine.images_encoded,
                "turns": [{"question": t.question, "answer": t.answer} for t in self.history],
                "dropped_turns": self.dropped_turns}
