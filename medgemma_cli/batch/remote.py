"""An OpenAI-compatible chat-completions client for `batch --server`: llama.cpp's server, llama-cpp-python's
server, vLLM. Standard library only; a socket is opened only towards the URL the user gave.

Images travel as PNG data URIs of exactly the pixels the local model would get (rendered, windowed and
resized by us), so a department server sees what a workstation would have seen.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import os
import queue
import select
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medgemma_cli.batch.pace import Limit, Pace, Size, request_size
from medgemma_cli.batch.prepare import Prepared, classification, prefetch
from medgemma_cli.batch.records import Recorder
from medgemma_cli.batch.units import Unit
from medgemma_cli.chat_template import compile_template, render, with_media_markers
from medgemma_cli.errors import MedgemmaError
from medgemma_cli.inputs.collect import Collected
from medgemma_cli.prompt import build_messages

if TYPE_CHECKING:
    from medgemma_cli.answering import AskOptions
    from medgemma_cli.siglip import ZeroShot

API_KEY_ENV = "MEDGEMMA_API_KEY"
RETRY_STATUS = (429, 502, 503, 504)  # asked again at once (busy, or a proxy in front of a restarting server)
CONNECT_TIMEOUT_S = 10.0
CHECK_EVERY_S = 5.0  # while an answer is awaited, this often the server is checked to be still there
# a 5xx that is about the request, not the server: asking again cannot help
_INPUT_ERRORS_5XX = ("exceed context", "context window", "n_ctx", "context length", "context size")
MAX_REPLY_BYTES = 16 << 20  # an answer of a few thousand tokens is a few KB; anything near this is not an answer


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class _Again(Exception):
    """A failure worth asking again about at once (refused, reset, busy); carries the error to report if not."""

    def __init__(self, error: ServerError):
        super().__init__(str(error))
        self.error = error


def _seconds(s: float) -> str:
    return f"{s:.1f}" if s < 10 else f"{s:.0f}"


def _read_reply(r: Any, deadline: float, limit: int = MAX_REPLY_BYTES) -> bytes:
    """The body, in pieces, so that a reply that trickles in still ends at the deadline and one that never ends
    stops at the size cap (urllib's timeout only bounds each single read)."""
    declared = r.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _TooLarge()
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise _TooSlow()
        piece = r.read1(65536) if hasattr(r, "read1") else r.read(65536)
        if not piece:
            return b"".join(chunks)
        size += len(piece)
        if size > limit:
            raise _TooLarge()
        chunks.append(piece)


class ServerError(MedgemmaError):
    """A request the server refused or could not answer; the batch records it and goes on.

    `retryable`: the request itself was fine and may succeed later (the server was unreachable, failed with a
    5xx, or did not answer in time); such records are tried again by the next run. `unreachable`: the server
    itself is gone, so the batch stops sending instead of filling the results with the same error."""

    def __init__(self, message: str, retryable: bool = False, unreachable: bool = False):
        super().__init__(message)
        self.retryable, self.unreachable = retryable, unreachable
        self.status: int | None = None  # the HTTP status, when the server answered with one


DEFAULT_MEDIA_MARKER = "<__media__>"  # libmtmd's; newer llama-servers name their own in /props


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _nonnegative_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass
class ServerInfo:
    """What a server said about itself; see ChatServer.describe."""
    kind: str  # "llama.cpp" (its own server, /props) or "openai" (any other OpenAI-compatible server)
    n_ctx: int | None  # tokens one request may hold (llama.cpp: per slot, -c divided by --parallel)
    slots: int | None = None
    weights: dict[str, int] | None = None  # size, n_params… of the model file, where the server reports them
    chat_template: str | None = None
    media_marker: str = DEFAULT_MEDIA_MARKER
    vision: bool | None = None

    def identity(self, model: str) -> str:
        """What a record's answers depend on: the model's name, and the weights' size and shape where the
        server reports them (a different file under the same name or path then never reuses old answers)."""
        if not self.weights:
            return "server:" + model
        return "server:" + model + "\n" + json.dumps(self.weights, sort_keys=True)


class ServerUnreachable(MedgemmaError):
    """The server went away during the batch: what was answered is kept, the rest waits for the next run."""


@dataclass
class Reply:
    answer: str
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None
    seconds: float


def png_data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chat_messages(question: str, inputs: Collected, image_uris: list[str], system: str | None = None,
                  with_metadata: bool = False) -> list[dict[str, Any]]:
    """The same turn `ask` builds (notes, images with their slice labels, question), in OpenAI's shape."""
    if len(image_uris) != len(inputs.images):
        raise ValueError("one data URI per image")
    uris = iter(image_uris)
    out: list[dict[str, Any]] = []
    for m in build_messages(question, inputs, system, with_metadata):
        parts: list[dict[str, Any]] = []
        for part in m["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": next(uris)}})
            else:
                parts.append(part)
        if m["role"] == "system":  # some servers accept only a string here
            out.append({"role": "system", "content": "\n".join(p["text"] for p in parts)})
        else:
            out.append({"role": m["role"], "content": parts})
    return out


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ChatServer:
    """One server; thread-safe (each request is its own connection, the speeds measured are behind a lock), so
    workers may share it."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600.0,
                 retries: int = 2, check_every: float = CHECK_EVERY_S, image_tokens: int = 256):
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc or not parts.hostname:
            raise MedgemmaError(f"--server {url!r}: give an http(s) URL such as http://127.0.0.1:8080")
        path = parts.path.rstrip("/")
        if path.endswith("/v1"):
            path = path[:-3]
        self.base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self._https, self._host, self._path = parts.scheme == "https", parts.hostname, path
        try:
            self._port = parts.port or (443 if self._https else 80)
        except ValueError:
            raise MedgemmaError(f"--server {url!r}: the port is not a number") from None
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout, self.retries, self.check_every = timeout, retries, check_every
        self.model = model
        self.image_tokens = image_tokens  # per image, for estimating a request's prompt (pace.request_size)
        self.pace = Pace()  # how long a question may wait, from this run's answers; set its `sharing` to the workers
        self._sent: set[str] = set()  # units asked about in this run (a later question's prompt may be cached)
        self._sent_lock = threading.Lock()
        self._entry: dict[str, Any] = {}  # the model's entry in /v1/models
        self._native: tuple[Any, str] | None = None  # llama.cpp's server: (its chat template, its media marker)
        self.schema_form = "json_schema"  # OpenAI's; "json_object" once a server refuses it (llama-cpp-python's)

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout)

    def alive(self) -> bool:
        """Whether the server still accepts connections. A llama-server stopped with SIGTERM closes its listening
        socket but leaves the requests it holds open and silent; a server that is only busy still accepts."""
        try:
            with socket.create_connection((self._host, self._port), timeout=CHECK_EVERY_S):
                return True
        except OSError:
            return False

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 retries: int | None = None) -> dict[str, Any]:
        return self._timed(method, path, body, retries)[0]

    def _timed(self, method: str, path: str, body: dict[str, Any] | None = None, retries: int | None = None,
               size: Size | None = None) -> tuple[dict[str, Any], float]:
        """The reply, and the seconds its (last) attempt took. A question (`size` given) may wait only as long as
        this run's answers say it needs (pace.py); one cut for that is asked again, each time with twice the bound
        (the estimate may have been short), while one that waited the whole --timeout is not."""
        data = json.dumps(body).encode("utf-8") if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                t0 = time.perf_counter()
                reply = self._once(method, path, data, headers, size, stretch=2.0 ** attempt)
                return reply, time.perf_counter() - t0
            except _Again as e:
                if attempt < retries:
                    time.sleep(1.0 + attempt)
                    continue
                raise e.error from None
        raise AssertionError("unreachable")

    def _limit(self, size: Size | None, stretch: float) -> Limit:
        """Looked up again while the answer is awaited: answers to other workers' requests may arrive meanwhile."""
        if size is None:
            return Limit(self.timeout, None, self.timeout)
        return self.pace.limit(size, self.timeout, stretch)

    def _late(self, size: Size | None, stretch: float, waited: float, whole: bool) -> ServerError | _Again:
        """No (whole) answer in time: after --timeout, final for this run; cut by the request's bound, asked again."""
        limit = self._limit(size, stretch)
        what = "no whole answer" if whole else "no answer"
        if not limit.bounded or size is None or limit.expected is None:
            return ServerError(f"{what} from {self.base} within {self.timeout:g} s (--timeout)", retryable=True)
        return _Again(ServerError(
            f"{what} from {self.base} in {_seconds(waited)} s, where this run's answers predict "
            f"{_seconds(limit.expected)} s for this request ({size.describe()}): cut at {_seconds(limit.seconds)} s "
            f"({self.pace.safety:g} × that × {self.pace.sharing} request(s) sharing the server, at least "
            f"{_seconds(self.pace.floor_s * stretch)} s; --timeout {self.timeout:g} s)", retryable=True))

    def _once(self, method: str, path: str, data: bytes | None, headers: dict[str, str], size: Size | None = None,
              stretch: float = 1.0) -> dict[str, Any]:
        """One request on its own connection. Waiting for the answer, the socket is watched: a reply, a closed
        connection or a server that stopped accepting connections ends the wait, and so does the request's
        limit (--timeout, or less for a question once this run's answers say how long it should take)."""
        start = time.monotonic()

        def left() -> float:
            return start + self._limit(size, stretch).seconds - time.monotonic()

        conn = self._connection(min(CONNECT_TIMEOUT_S, self.timeout))
        try:
            try:
                conn.connect()
            except OSError as e:  # refused, no route, or no TCP answer within CONNECT_TIMEOUT_S
                raise _Again(ServerError(f"cannot reach {self.base}: {e.strerror or e or type(e).__name__}",
                                         retryable=True, unreachable=True)) from None
            if conn.sock is not None:
                conn.sock.settimeout(max(0.1, left()))
            try:
                conn.request(method, self._path + path, body=data, headers=headers)
                self._await_reply(conn, left)
                if conn.sock is not None:
                    conn.sock.settimeout(max(0.1, left()))
                r = conn.getresponse()
                raw = _read_reply(r, time.monotonic() + left())
            except _TooLarge:
                raise ServerError(f"{self.base}{path}: a reply over {MAX_REPLY_BYTES >> 20} MB; not an answer"
                                  ) from None
            except _TooSlow:  # trickling in: the same as no answer
                raise self._late(size, stretch, time.monotonic() - start, whole=True) from None
            except TimeoutError:  # after --timeout it may still be working on it: asking again would pile up
                raise self._late(size, stretch, time.monotonic() - start, whole=False) from None
            except (OSError, http.client.HTTPException) as e:  # refused, reset, cut short
                reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__)
                raise _Again(ServerError(f"cannot reach {self.base}: {reason}", retryable=True,
                                         unreachable=not self.alive())) from None
        finally:
            conn.close()
        if r.status >= 400:
            message = f"{self.base} answered {r.status}: {_server_message(raw, r.reason)}"
            input_error = (r.status < 500 and r.status != 429) or any(
                k in message.lower() for k in _INPUT_ERRORS_5XX)
            error = ServerError(message, retryable=not input_error)
            error.status = r.status
            if r.status in RETRY_STATUS:
                raise _Again(error)
            raise error
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:  # not JSON, or not UTF-8
            raise ServerError(f"{self.base}{path} did not answer with JSON "
                              "(is this an OpenAI-compatible server?)") from None

    def _await_reply(self, conn: http.client.HTTPConnection, left: Callable[[], float]) -> None:
        """Until the first byte of the reply (or the connection's end) can be read, or `left()` (the seconds this
        request may still wait) runs out; between looks, the server is checked to still accept connections."""
        sock = conn.sock
        if sock is None:
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        while True:
            remaining = left()
            if remaining <= 0:
                raise TimeoutError()
            ready, _, _ = select.select([sock], [], [], min(self.check_every, remaining))
            if ready:
                return
            if not self.alive():
                raise ServerError(f"{self.base} stopped accepting connections while an answer was awaited "
                                  "(stopped or restarting?)", retryable=True, unreachable=True)

    def _entries(self) -> list[dict[str, Any]]:
        data = self._request("GET", "/v1/models", retries=0).get("data") or []
        return [m for m in data if isinstance(m, dict) and m.get("id")]

    def models(self) -> list[str]:
        return [str(m["id"]) for m in self._entries()]

    def resolve_model(self) -> str:
        """The model the requests will name (and the record's model id): the one asked for, or the server's only one."""
        entries = self._entries()
        available = [str(m["id"]) for m in entries]
        if self.model is None:
            if not available:
                raise MedgemmaError(f"{self.base} lists no models; name one with --server-model")
            if len(available) > 1:
                raise MedgemmaError(f"{self.base} serves {len(available)} models ({', '.join(available[:5])}); "
                                    "choose one with --server-model")
            self.model = available[0]
        elif available and self.model not in available:
            raise MedgemmaError(f"{self.base} does not serve {self.model!r} (it serves {', '.join(available[:5])})")
        self._entry = next((m for m in entries if str(m["id"]) == self.model), {})
        return self.model

    def describe(self) -> ServerInfo:
        """What the server says about itself (after resolve_model): llama.cpp's server answers /props with its
        context per slot, chat template and media marker, and lists the model file's size and parameter count
        in /v1/models; vLLM lists max_model_len. Anything it does not say stays None."""
        entry = self._entry
        props: dict[str, Any] | None = None
        try:
            got = self._request("GET", "/props", retries=0)
            if isinstance(got.get("default_generation_settings"), dict):
                props = got
        except ServerError:
            pass  # not llama.cpp's server
        n_ctx = None
        if props is not None:
            n_ctx = _positive_int(props["default_generation_settings"].get("n_ctx"))
        elif (n := _positive_int(entry.get("max_model_len"))) is not None:
            n_ctx = n
        meta: dict[str, Any] = entry["meta"] if isinstance(entry.get("meta"), dict) else {}
        weights = {k: meta[k] for k in ("size", "n_params", "n_vocab", "n_embd", "n_ctx_train")
                   if isinstance(meta.get(k), int)}
        template = props.get("chat_template") if props is not None else None
        marker = props.get("media_marker") if props is not None else None
        modalities = props.get("modalities") if props is not None else None
        return ServerInfo(
            kind="llama.cpp" if props is not None else "openai", n_ctx=n_ctx,
            slots=_positive_int(props.get("total_slots")) if props is not None else None,
            weights=weights, chat_template=template if isinstance(template, str) and template else None,
            media_marker=marker if isinstance(marker, str) and marker else DEFAULT_MEDIA_MARKER,
            vision=bool(modalities.get("vision")) if isinstance(modalities, dict) else None)

    def _constrained(self, body: dict[str, Any], schema: dict[str, Any], size: Size) -> tuple[dict[str, Any], float]:
        """A chat request whose answer must follow `schema`; a server that refuses OpenAI's form of it gets the
        older one (llama-cpp-python's server takes only {"type": "json_object", "schema": …})."""
        try:
            return self._timed("POST", "/v1/chat/completions",
                               {**body, "response_format": response_format(schema, self.schema_form)}, size=size)
        except ServerError as e:
            # refused as a bad request; llama-cpp-python's server says so with a 500 that names the field
            if self.schema_form != "json_schema" or not (e.status in (400, 422) or "response_format" in str(e)):
                raise
        self.schema_form = "json_object"
        return self._timed("POST", "/v1/chat/completions",
                           {**body, "response_format": response_format(schema, self.schema_form)}, size=size)

    def _measured(self, size: Size, data: dict[str, Any], answer: str, completion_tokens: int | None,
                  seconds: float, sent_before: bool = False) -> None:
        """One answer's speeds, for the limits of the next questions; llama.cpp's server (native and chat
        endpoints) says how it split its time between the prompt and the answer in `timings`. A prompt whose
        unit was `sent_before`, or that the server says it partly read from its cache, teaches no prompt speed."""
        timings = data.get("timings")
        usage = data.get("usage")
        details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
        cached = max(_nonnegative_int(timings.get("cache_n")) or 0 if isinstance(timings, dict) else 0,
                     _nonnegative_int(details.get("cached_tokens")) or 0 if isinstance(details, dict) else 0)
        split = None
        if isinstance(timings, dict):
            prompt_ms, predicted_ms = timings.get("prompt_ms"), timings.get("predicted_ms")
            if (isinstance(prompt_ms, (int, float)) and isinstance(predicted_ms, (int, float))
                    and not isinstance(prompt_ms, bool) and not isinstance(predicted_ms, bool)):
                split = (float(prompt_ms), float(predicted_ms))
        generated = completion_tokens if completion_tokens is not None else len(answer) // 4  # rough, if unsaid
        self.pace.record(size, generated, seconds, split, fresh_prompt=not sent_before and not cached)

    def _first_send(self, unit_key: str | None) -> bool:
        """Whether this is the first question of the run about this unit (a server may cache its prompt after)."""
        if unit_key is None:
            return True
        with self._sent_lock:
            first = unit_key not in self._sent
            self._sent.add(unit_key)
        return first

    def use_native(self, info: ServerInfo) -> bool:
        """Against llama.cpp's own server, prompts go through its native /completion endpoint, rendered here from
        the server's chat template exactly as the local model renders them (its chat endpoint puts no blank lines
        around images and joins text parts with a newline: 2 tokens per image fewer, other answers). Other
        servers get chat completions (vLLM's Gemma 3 processor adds the blank lines itself)."""
        if info.kind == "llama.cpp" and info.chat_template:
            self._native = (compile_template(info.chat_template), info.media_marker)
        return self._native is not None

    def ask(self, question: str, inputs: Collected, image_uris: list[str], opts: AskOptions,
            unit_key: str | None = None) -> Reply:
        """One question about one unit's inputs, by whichever endpoint use_native chose. `unit_key` names the
        unit, so that only its first question's prompt counts towards the server's prompt speed."""
        sent_before = not self._first_send(unit_key)
        if self._native is None:
            return self.chat(chat_messages(question, inputs, image_uris, opts.system_text(), opts.with_metadata),
                             opts.budget(True), opts.temperature, opts.seed, schema=opts.schema,
                             sent_before=sent_before)
        template, marker = self._native
        # no BOS in the text: llama-server adds it to a string prompt, as the GGUF asks (add_bos_token)
        rendered = render(template, build_messages(question, inputs, opts.system_text(), opts.with_metadata), bos="")
        prompt = with_media_markers(rendered, marker, len(image_uris))
        return self.complete(prompt, [uri.split(",", 1)[1] for uri in image_uris], opts.budget(True),
                             opts.temperature, opts.seed, schema=opts.schema, sent_before=sent_before)

    def complete(self, prompt: str, images_b64: list[str], max_tokens: int, temperature: float = 0.0,
                 seed: int | None = 0, schema: dict[str, Any] | None = None, sent_before: bool = False) -> Reply:
        """llama.cpp's native /completion: the prompt as written, media markers standing for the images."""
        body: dict[str, Any] = {
            "prompt": {"prompt_string": prompt, "multimodal_data": images_b64} if images_b64 else prompt,
            "n_predict": max_tokens, "temperature": temperature, "stream": False,
            "repeat_penalty": 1.0,  # llama.cpp servers default to 1.1; greedy means greedy
            "cache_prompt": False}  # a reused cache may change the logits (llama-server's README): fresh each time
        if seed is not None:
            body["seed"] = seed
        if schema is not None:  # llama-server turns it into its grammar
            body["json_schema"] = schema
        size = request_size(len(images_b64), len(prompt), max_tokens, self.image_tokens)
        t0 = time.perf_counter()
        data, attempt_s = self._timed("POST", "/completion", body, size=size)
        seconds = time.perf_counter() - t0
        content = data.get("content")
        if not isinstance(content, str):
            raise ServerError(f"{self.base}: a /completion reply without content")
        stop = {"limit": "length", "eos": "stop", "word": "stop"}.get(str(data.get("stop_type") or ""), "")
        completion_tokens = _nonnegative_int(data.get("tokens_predicted"))
        self._measured(size, data, content, completion_tokens, attempt_s, sent_before)
        return Reply(content.strip(), stop, _positive_int(data.get("tokens_evaluated")), completion_tokens, seconds)

    def chat(self, messages: list[dict[str, Any]], max_tokens: int, temperature: float = 0.0,
             seed: int | None = 0, schema: dict[str, Any] | None = None, sent_before: bool = False) -> Reply:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature, "stream": False,
                                "repeat_penalty": 1.0}  # llama.cpp servers default to 1.1; greedy means greedy
        if seed is not None:
            body["seed"] = seed
        size = _chat_size(messages, max_tokens, self.image_tokens)
        t0 = time.perf_counter()
        if schema is not None:
            data, attempt_s = self._constrained(body, schema, size)
        else:
            data, attempt_s = self._timed("POST", "/v1/chat/completions", body, size=size)
        seconds = time.perf_counter() - t0
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ServerError(f"{self.base}: a reply without choices[0].message") from None
        usage: dict[str, Any] = data["usage"] if isinstance(data.get("usage"), dict) else {}
        self._measured(size, data, str(content), _nonnegative_int(usage.get("completion_tokens")), attempt_s,
                       sent_before)
        return Reply(str(content).strip(), str(choice.get("finish_reason") or ""), usage.get("prompt_tokens"),
                     usage.get("completion_tokens"), seconds)


def _chat_size(messages: list[dict[str, Any]], max_tokens: int, image_tokens: int) -> Size:
    """What a chat request asks: its images, and its text (counted in characters) for the prompt's tokens."""
    images = chars = 0
    for m in messages:
        content = m.get("content")
        for part in content if isinstance(content, list) else [{"type": "text", "text": content or ""}]:
            if part.get("type") == "image_url":
                images += 1
            else:
                chars += len(str(part.get("text") or ""))
    return request_size(images, chars, max_tokens, image_tokens)


def response_format(schema: dict[str, Any], form: str) -> dict[str, Any]:
    """The schema as a chat request's response_format: OpenAI's structured outputs (llama.cpp's server, vLLM),
    or the older {"type": "json_object", "schema": …} that llama-cpp-python's server takes."""
    if form == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    return {"type": "json_object", "schema": schema}


def _server_message(raw: bytes, reason: str) -> str:
    text = raw.decode("utf-8", "replace")
    try:
        data = json.loads(text)
        err = data.get("error", data.get("detail", data.get("message", text))) if isinstance(data, dict) else text
        if isinstance(err, dict):
            err = err.get("message", err)
        text = str(err)
    except json.JSONDecodeError:
        pass
    return " ".join(text.split())[:300] or reason or "error"


def answer_by_server(client: ChatServer, workers: int, todo: list[Unit], prepare: Callable[[Unit], Prepared],
                     opts: AskOptions, writer: Recorder, zero_shot: ZeroShot | None,
                     on_progress: Callable[[int, int, str], None] | None) -> float:
    """Up to `workers` requests in flight; records are appended here, in the order answers arrive.

    The request threads are daemons (not a ThreadPoolExecutor, whose workers are joined at exit): Ctrl-C ends
    the run at once instead of waiting for answers that would no longer be written."""
    @dataclass
    class State:
        prepared: Prepared
        remaining: int
        classification: dict[str, Any] | None = None
        failed: bool = False

    jobs: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()

    def work() -> None:
        while (job := jobs.get()) is not None:
            state, q = job
            p = state.prepared
            assert p.inputs is not None  # units without inputs are recorded as failed, never sent
            try:
                results.put((state, q, client.ask(q, p.inputs, p.image_uris, opts, unit_key=p.unit.id)))
            except Exception as e:  # noqa: BLE001 - handed to the main thread, which decides
                results.put((state, q, e))

    for i in range(workers):
        threading.Thread(target=work, name=f"medgemma-batch-request-{i}", daemon=True).start()
    in_flight = finished_units = 0
    request_seconds = 0.0

    gone: list[ServerError] = []  # the server stopped accepting connections: no new requests are sent

    def settle(limit: int) -> None:
        nonlocal in_flight, finished_units, request_seconds
        while in_flight > limit:
            state, q, reply = results.get()
            in_flight -= 1
            u = state.prepared.unit
            if isinstance(reply, ServerError):
                state.failed = True
                writer.error(u, q, str(reply), retryable=reply.retryable)
                if reply.unreachable and not gone:
                    gone.append(reply)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                request_seconds += reply.seconds
                writer.answer(u, q, len(state.prepared.inputs.images), reply.answer,
                              {"total_s": round(reply.seconds, 3)},
                              {"prompt": reply.prompt_tokens, "completion": reply.completion_tokens},
                              state.classification, state.prepared.inputs)
            state.remaining -= 1
            if state.remaining == 0:
                finished_units += 1
                writer.failed += state.failed

    try:
        for p in prefetch(todo, prepare, depth=workers):
            u = p.unit
            if on_progress:
                on_progress(finished_units, len(todo), u.id)
            if p.error is not None or p.inputs is None:
                writer.fail_unit(u, p.error or "nothing could be read")
                finished_units += 1
                continue
            qs = writer.pending(u)
            state = State(p, len(qs))
            for q in qs:
                jobs.put((state, q))
                in_flight += 1
            if zero_shot is not None and p.inputs.images:  # runs here while the server works
                state.classification = classification(zero_shot, p.inputs)
            settle(limit=2 * workers)  # a bounded queue: the folder is not read into memory ahead of the server
            if gone:
                break
        settle(limit=0)
        if gone:
            raise ServerUnreachable(f"{gone[0]}; {writer.written} record(s) written, {writer.retryable} to retry: "
                                    "run the same command again once the server is back")
    finally:
        for _ in range(workers):
            jobs.put(None)
    return request_seconds
