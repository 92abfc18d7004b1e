"""How long one `batch --server` request may go unanswered: what it asks of the server, at the speeds this server
showed on the answers it already gave in this run, with a wide margin; never longer than --timeout.

A server that accepts connections but never answers (a hung GPU, a dead backend behind a proxy) is then given up
on after a bound in proportion to the request instead of after --timeout (600 s), while a large request that
takes proportionally longer is not cut. Before any answer, nothing is known and only --timeout applies.

The model: a request's time is reading its prompt (its images and text) plus writing up to max_tokens. Each
answer shows speeds that are at least what the server can do: prompt tokens over the time it spent on the
prompt and generated tokens over the time it spent writing; where the server does not say how it split its
time (llama.cpp's `timings` do), each part is given the whole wall time. The fastest speeds seen are kept;
waiting behind other requests (ours, or other clients' in other slots) is what the margin and the sharing
factor are for, not something measured. A prompt the server may have read from its own cache (a later question
about a unit already sent, or one it says was cached) says nothing of its prompt speed: only its writing counts,
else one cached prompt would make every later large request look short and be cut early.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

SAFETY = 4.0  # a request may take this many times what the answers so far predict for it (times `sharing`)
FLOOR_S = 30.0  # and never less: a pause (another client's long prompt, a swap) is not a dead server
CHARS_PER_TOKEN = 4  # text, roughly; only ratios between requests of one run matter, so a rough count does


@dataclass(frozen=True)
class Size:
    """What one request asks of the server. `prompt_tokens` is estimated here, the same way for every request,
    so that its ratios between requests are right even where the estimate is not."""
    images: int
    prompt_tokens: int
    max_tokens: int

    def describe(self) -> str:
        return f"{self.images} image(s), ~{self.prompt_tokens} prompt tokens, up to {self.max_tokens} new"


def request_size(images: int, text_chars: int, max_tokens: int, image_tokens: int) -> Size:
    return Size(images, images * image_tokens + text_chars // CHARS_PER_TOKEN + 1, max_tokens)


@dataclass(frozen=True)
class Limit:
    """How long one request may wait, and why: `expected` (None before any answer) is the prediction."""
    seconds: float
    expected: float | None
    timeout: float

    @property
    def bounded(self) -> bool:
        """Whether the prediction, not --timeout, sets the limit."""
        return self.expected is not None and self.seconds < self.timeout


class Pace:
    """The speeds one server showed in this run; shared by the request threads (a lock guards them).

    `sharing`: how many requests may share the server's time with one of ours — our other workers', and on a
    server that reports its slots, as many as it runs at once (other clients' included)."""

    def __init__(self, sharing: int = 1, safety: float | None = None, floor_s: float | None = None):
        self.sharing = max(1, sharing)
        self.safety = SAFETY if safety is None else safety
        self.floor_s = FLOOR_S if floor_s is None else floor_s
        self._lock = threading.Lock()
        self._prompt_speed: float | None = None  # prompt tokens per second, the fastest seen
        self._decode_speed: float | None = None  # generated tokens per second, the fastest seen
        self.answers = 0

    def record(self, size: Size, completion_tokens: int, seconds: float,
               server_split: tuple[float, float] | None = None, fresh_prompt: bool = True) -> None:
        """One answer: `seconds` from sending the request to the whole reply; `server_split` the server's own
        seconds on the prompt and on generating, where it reports them; `fresh_prompt` false where the server may
        have reused a cached prompt (then only the writing speed is learnt)."""
        prompt_s = decode_s = seconds
        if server_split is not None and server_split[0] >= 0 and server_split[1] >= 0 and sum(server_split) > 0:
            share = server_split[0] / sum(server_split)  # the wall time (queueing, HTTP included) split alike
            prompt_s, decode_s = seconds * share, seconds * (1 - share)
        prompt_speed = size.prompt_tokens / prompt_s if prompt_s > 0 and fresh_prompt else None
        decode_speed = completion_tokens / decode_s if completion_tokens > 0 and decode_s > 0 else None
        with self._lock:
            if prompt_speed is not None:
                self._prompt_speed = max(self._prompt_speed or 0.0, prompt_speed)
            if decode_speed is not None:
                self._decode_speed = max(self._decode_speed or 0.0, decode_speed)
            self.answers += 1

    def expected(self, size: Size) -> float | None:
        """Seconds this request should take at the speeds seen; None while either speed is unknown."""
        with self._lock:
            prompt_speed, decode_speed = self._prompt_speed, self._decode_speed
        if prompt_speed is None or decode_speed is None:
            return None
        return size.prompt_tokens / prompt_speed + size.max_tokens / decode_speed

    def limit(self, size: Size, timeout: float, stretch: float = 1.0) -> Limit:
        """How long this request may wait: `stretch` widens the bound for a request asked again after a cut."""
        expected = self.expected(size)
        if expected is None:
            return Limit(timeout, None, timeout)
        bound = max(self.floor_s, self.safety * self.sharing * expected) * stretch
        return Limit(min(timeout, bound), expected, timeout)
