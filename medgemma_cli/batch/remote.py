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
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medgemma_cli.batch.prepare import Prepared, classification, prefetch
from medgemma_cli.batch.records import Recorder
from medgemma_cli.batch.units import Unit
from medgemma_cli.errors import MedgemmaError
from medgemma_cli.inputs.collect import Collected
from medgemma_cli.prompt import build_messages

if TYPE_CHECKING:
    from medgemma_cli.answering import AskOptions
    from medgemma_cli.siglip import ZeroShot

API_KEY_ENV = "MEDGEMMA_API_KEY"
RETRY_STATUS = (429, 502, 503, 504)
MAX_REPLY_BYTES = 16 << 20  # an answer of a few thousand tokens is a few KB; anything near this is not an answer


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


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
    """A request the server refused or could not answer; the batch records it and goes on."""


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
    """One server; thread-safe (each request is its own connection), so workers may share it."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = 600.0,
                 retries: int = 2):
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise MedgemmaError(f"--server {url!r}: give an http(s) URL such as http://127.0.0.1:8080")
        path = parts.path.rstrip("/")
        if path.endswith("/v1"):
            path = path[:-3]
        self.base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout, self.retries = timeout, retries
        self.model = model

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 retries: int | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode("utf-8") if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = self.base + path
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            deadline = time.monotonic() + self.timeout
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(_read_reply(r, deadline).decode("utf-8"))
            except _TooLarge:
                raise ServerError(f"{self.base}{path}: a reply over {MAX_REPLY_BYTES >> 20} MB; not an answer"
                                  ) from None
            except _TooSlow:  # trickling in: the same as no answer
                raise ServerError(f"no whole answer from {self.base} within {self.timeout:g} s (--timeout)") from None
            except urllib.error.HTTPError as e:
                if e.code in RETRY_STATUS and attempt < retries:
                    time.sleep(1.0 + attempt)
                    continue
                raise ServerError(f"{self.base} answered {e.code}: {_server_message(e)}") from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, cut short
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):  # it may still be working on it: asking again would pile up
                    raise ServerError(f"no answer from {self.base} within {self.timeout:g} s (--timeout)") from None
                if attempt < retries:
                    time.sleep(1.0 + attempt)
                    continue
                raise ServerError(f"cannot reach {self.base}: {reason}") from None
            except ValueError:  # not JSON, or not UTF-8
                raise ServerError(f"{self.base}{path} did not answer with JSON "
                                  "(is this an OpenAI-compatible server?)") from None
        raise AssertionError("unreachable")

    def models(self) -> list[str]:
        data = self._request("GET", "/v1/models", retries=0).get("data") or []
        return [str(m.get("id")) for m in data if m.get("id")]

    def resolve_model(self) -> str:
        """The model the requests will name (and the record's model id): the one asked for, or the server's only one."""
        available = self.models()
        if self.model is None:
            if not available:
                raise MedgemmaError(f"{self.base} lists no models; name one with --server-model")
            if len(available) > 1:
                raise MedgemmaError(f"{self.base} serves {len(available)} models ({', '.join(available[:5])}); "
                                    "choose one with --server-model")
            self.model = available[0]
        elif available and self.model not in available:
            raise MedgemmaError(f"{self.base} does not serve {self.model!r} (it serves {', '.join(available[:5])})")
        return self.model

    def chat(self, messages: list[dict[str, Any]], max_tokens: int, temperature: float = 0.0,
             seed: int | None = 0) -> Reply:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature, "stream": False,
                                "repeat_penalty": 1.0}  # llama.cpp servers default to 1.1; greedy means greedy
        if seed is not None:
            body["seed"] = seed
        t0 = time.perf_counter()
        data = self._request("POST", "/v1/chat/completions", body)
        seconds = time.perf_counter() - t0
        try:
            choice = data["choices"][0]
            content = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ServerError(f"{self.base}: a reply without choices[0].message") from None
        usage = data.get("usage") or {}
        return Reply(str(content).strip(), str(choice.get("finish_reason") or ""), usage.get("prompt_tokens"),
                     usage.get("completion_tokens"), seconds)


def _server_message(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read().decode("utf-8", "replace")
    except OSError:
        return e.reason or "error"
    try:
        data = json.loads(raw)
        err = data.get("error", data.get("detail", data.get("message", raw)))
        if isinstance(err, dict):
            err = err.get("message", err)
        text = str(err)
    except json.JSONDecodeError:
        text = raw
    return " ".join(text.split())[:300] or str(e.reason)


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
            state, q, messages = job
            try:
                results.put((state, q, client.chat(messages, opts.max_tokens, opts.temperature, opts.seed)))
            except Exception as e:  # noqa: BLE001 - handed to the main thread, which decides
                results.put((state, q, e))

    for i in range(workers):
        threading.Thread(target=work, name=f"medgemma-batch-request-{i}", daemon=True).start()
    in_flight = finished_units = 0
    request_seconds = 0.0

    def settle(limit: int) -> None:
        nonlocal in_flight, finished_units, request_seconds
        while in_flight > limit:
            state, q, reply = results.get()
            in_flight -= 1
            u = state.prepared.unit
            if isinstance(reply, ServerError):
                state.failed = True
                writer.error(u, q, str(reply))
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
                jobs.put((state, q, chat_messages(q, p.inputs, p.image_uris, opts.system, opts.with_metadata)))
                in_flight += 1
            if zero_shot is not None and p.inputs.images:  # runs here while the server works
                state.classification = classification(zero_shot, p.inputs)
            settle(limit=2 * workers)  # a bounded queue: the folder is not read into memory ahead of the server
        settle(limit=0)
    finally:
        for _ in range(workers):
            jobs.put(None)
    return request_seconds
