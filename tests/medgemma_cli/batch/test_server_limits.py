"""`batch --server` against small stand-in servers (model-free, on 127.0.0.1): the server's context per slot
plans the slices, failures of the server are retried by the next run while bad requests stay final, a server
that goes away ends the run early, and the weights it reports key the records."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from folders import ct_series
from medgemma_cli.answering import AskOptions
from medgemma_cli.batch import ServerOptions, run_batch
from medgemma_cli.batch.remote import ChatServer, ServerError, ServerUnreachable
from medgemma_cli.errors import MedgemmaError
from pictures import picture

pytestmark = pytest.mark.uses_network  # servers started here on 127.0.0.1


class StandIn:
    """An OpenAI-compatible server on 127.0.0.1; `props` set makes it answer /props as llama.cpp's server does.
    `answer(body)` → (status, reply) decides each chat request."""

    def __init__(self, props: dict | None = None, meta: dict | None = None, answer=None):
        self.props, self.meta = props, meta
        self.answer = answer or (lambda body: (200, self.reply("No acute findings.")))
        self.requests: list[dict] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                if self.path == "/v1/models":
                    entry = {"id": "medgemma.gguf", "object": "model", **({"meta": stand_in.meta} if stand_in.meta
                                                                          else {})}
                    self._send(200, {"object": "list", "data": [entry]})
                elif self.path == "/props" and stand_in.props is not None:
                    self._send(200, stand_in.props)
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.requests.append(body)
                status, reply = stand_in.answer(body)
                try:
                    self._send(status, reply)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on this request (cut at its bound) and closed the connection

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @staticmethod
    def reply(text: str) -> dict:
        return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 30, "completion_tokens": 4}}

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def llama_props(n_ctx: int, slots: int) -> dict:
    return {"default_generation_settings": {"id": 0, "n_ctx": n_ctx, "params": {}}, "total_slots": slots,
            "model_path": "/srv/models/medgemma.gguf", "modalities": {"vision": True}}


def pictures(root, n: int = 3):
    root.mkdir()
    for i in range(n):
        Image.fromarray(picture(20, 20, 40 * i)).save(root / f"i{i}.png")
    return root


def records(path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_slices_are_planned_for_the_servers_context(tmp_path):
    """llama-server -c 4096 --parallel 2 holds 2048 tokens per request: a CT series is sampled to what fits
    there, not to the local --ctx (8192), which the server would refuse with a 400."""
    root = tmp_path / "ct"
    root.mkdir()
    ct_series(root, 12, "1.2.826.0.1.3680043.99.5")
    server = StandIn(props=llama_props(2048, 2))
    try:
        out = tmp_path / "r.jsonl"
        s = run_batch(root, ["Findings?"], out, server=ServerOptions(server.url, image_size=32),
                      options=AskOptions(max_tokens=64))
    finally:
        server.stop()
    (r,) = records(out)
    assert r["error"] is None and s.context == 2048
    assert r["images_sent"] == (2048 - 64 - 512) // (256 + 8) == 5
    images = [p for m in server.requests[0]["messages"] for p in m["content"] if p.get("type") == "image_url"]
    assert len(images) == 5


def test_a_server_too_small_for_one_image_is_refused_before_anything_is_written(tmp_path):
    root = pictures(tmp_path / "imgs")
    server = StandIn(props=llama_props(1024, 4))
    try:
        out = tmp_path / "r.jsonl"
        with pytest.raises(MedgemmaError, match=r"holds 1024 tokens per request \(its context divided by 4 slots\)"):
            run_batch(root, ["Findings?"], out, server=ServerOptions(server.url, image_size=32),
                      options=AskOptions(max_tokens=512))
    finally:
        server.stop()
    assert not out.exists() and not server.requests


def test_server_failures_are_retried_by_the_next_run_and_bad_requests_are_not(tmp_path):
    """A 500 (the server failed) is recorded as retryable and a plain re-run asks again, leaving one record per
    (unit, question); a 400 (the request was refused) stays final unless --retry-failed."""
    root = pictures(tmp_path / "imgs")
    failing = [True]

    def answer(body):
        question = body["messages"][-1]["content"][-1]["text"]
        if question == "Refused?":
            return 400, {"error": {"message": "invalid request", "code": 400}}
        if failing[0]:
            return 500, {"error": {"message": "CUDA error: out of memory", "code": 500}}
        return 200, StandIn.reply("Normal.")

    server = StandIn(answer=answer)
    out = tmp_path / "r.jsonl"
    try:
        first = run_batch(root, ["Findings?", "Refused?"], out, server=ServerOptions(server.url, image_size=32))
        assert first.records_written == 6 and first.to_retry == 3 and first.failed == 3
        rs = records(out)
        assert sum(r.get("retryable") is True for r in rs) == 3
        assert all(r["question"] == "Findings?" for r in rs if r.get("retryable"))
        assert all("retryable" not in r for r in rs if r["question"] == "Refused?")

        failing[0] = False
        n_before = len(server.requests)
        second = run_batch(root, ["Findings?", "Refused?"], out, server=ServerOptions(server.url, image_size=32))
        assert second.retrying == 3 and second.records_written == 3 and second.to_retry == 0
        assert len(server.requests) - n_before == 3  # only the failed ones were asked again
    finally:
        server.stop()
    rs = records(out)
    assert len(rs) == 6 and len({(r["unit"], r["question"]) for r in rs}) == 6
    assert sorted(r["answer"] or r["error"][:30] for r in rs) == ["Normal."] * 3 + [
        f"{server.url} answered 400"[:30]] * 3


def test_a_server_that_goes_away_ends_the_run_and_the_rest_waits(tmp_path):
    """Once the server refuses connections, no more requests are sent; the next run answers the rest."""
    root = pictures(tmp_path / "imgs", 6)
    server = StandIn()
    answered = [0]

    def answer_once(body):
        answered[0] += 1
        if answered[0] == 2:  # the server goes down after its first answer
            threading.Thread(target=server.stop, daemon=True).start()
            time.sleep(0.5)
        return 200, StandIn.reply("Normal.")

    server.answer = answer_once
    out = tmp_path / "r.jsonl"
    t0 = time.monotonic()
    with pytest.raises(ServerUnreachable, match="run the same command again"):
        run_batch(root, ["Findings?"], out, server=ServerOptions(server.url, image_size=32))
    assert time.monotonic() - t0 < 30
    rs = records(out)
    assert len(rs) < 6 and all(r["error"] is None or r.get("retryable") for r in rs)

    back = StandIn()  # the server is back (on another port: the records are keyed by model, not address)
    try:
        s = run_batch(root, ["Findings?"], out, server=ServerOptions(back.url, image_size=32))
    finally:
        back.stop()
    rs = records(out)
    assert s.failed == 0 and len(rs) == 6 and all(r["error"] is None for r in rs)


def test_a_server_stopped_while_holding_the_request_is_noticed_before_the_timeout():
    """llama-server stopped with SIGTERM closes its listening socket but keeps the connections it holds open
    and silent: the client notices that the server no longer accepts connections, instead of waiting --timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    held = []

    def accept_and_hold():
        conn, _ = srv.accept()
        held.append(conn)  # never answered
        time.sleep(0.5)
        srv.close()  # SIGTERM: the listener goes, the held connection stays

    threading.Thread(target=accept_and_hold, daemon=True).start()
    client = ChatServer(f"http://127.0.0.1:{srv.getsockname()[1]}", "m", timeout=120.0, check_every=0.5)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match="stopped accepting connections") as e:
        client.chat([{"role": "user", "content": "x"}], 4)
    assert time.monotonic() - t0 < 10 and e.value.retryable and e.value.unreachable
    for c in held:
        c.close()


def test_records_are_keyed_by_the_weights_the_server_reports(tmp_path):
    """A different GGUF at the same path (llama-server reports its size and parameter count) never reuses
    old answers; the same one resumes."""
    root = pictures(tmp_path / "imgs", 2)
    out = tmp_path / "r.jsonl"
    meta = {"vocab_type": 1, "n_vocab": 262208, "n_ctx_train": 131072, "n_embd": 2560, "n_params": 3880263168,
            "size": 2489909760}
    for size, written in ((2489909760, 2), (2489909760, 0), (4130226432, 2)):
        server = StandIn(props=llama_props(8192, 1), meta={**meta, "size": size})
        try:
            s = run_batch(root, ["Findings?"], out, server=ServerOptions(server.url, image_size=32))
        finally:
            server.stop()
        assert s.records_written == written, size
    assert {r["model"] for r in records(out)} == {"medgemma.gguf"}


# --- how long a question may wait (batch/pace.py) -----------------------------------------------------------

def image_chat(images: int) -> list[dict]:
    """A chat turn with `images` images (the stand-in does not look at them)."""
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}} for _ in range(images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "Findings?"}]}]


class Silence:
    """Answers the first `answered` requests after `per_image` seconds per image, then holds the rest unanswered
    (the connection open, the server still accepting: a hung backend) until released."""

    def __init__(self, answered: int, per_image: float = 0.0):
        self.answered, self.per_image = answered, per_image
        self.release = threading.Event()
        self.seen = 0

    def __call__(self, body: dict) -> tuple[int, dict]:
        self.seen += 1
        if self.seen > self.answered:
            self.release.wait(60)
            return 503, {"error": {"message": "released"}}
        images = sum(p.get("type") == "image_url" for m in body.get("messages", []) for p in m["content"]
                     if isinstance(m["content"], list))
        time.sleep(self.per_image * images)
        return 200, StandIn.reply("Normal.")


def test_a_silent_server_after_fast_answers_is_given_up_on_long_before_the_timeout():
    """Three answers in well under a second, then silence from a server that still accepts connections: the
    question is cut at its bound (the floor here), asked again with twice the bound, then recorded as retryable
    with a message saying what was expected — not after --timeout (20 s)."""
    from medgemma_cli.batch.pace import Pace

    silence = Silence(answered=3)
    server = StandIn(answer=silence)
    try:
        client = ChatServer(server.url, "medgemma.gguf", timeout=20.0, retries=1, check_every=0.2)
        client.pace = Pace(floor_s=0.5)
        for _ in range(3):
            client.chat(image_chat(1), max_tokens=4)
        t0 = time.monotonic()
        with pytest.raises(ServerError) as e:
            client.chat(image_chat(1), max_tokens=4)
        waited = time.monotonic() - t0
    finally:
        silence.release.set()
        server.stop()
    assert waited < 5, waited  # 0.5 s, a second's pause, 1 s
    assert e.value.retryable and not e.value.unreachable
    message = str(e.value)
    assert "\n" not in message and "predict" in message and "1 image(s)" in message and "--timeout 20 s" in message
    assert silence.seen == 5  # asked again once (retries=1)


def test_a_proportionally_larger_request_is_not_cut_and_a_silent_one_of_its_size_is():
    """The bound grows with the request: twelve images at the server's pace of one image (0.15 s each) take 1.8 s,
    longer than the bound of a one-image question, and are not cut; the same request unanswered is cut at
    (here) twice its expected time, long before --timeout."""
    from medgemma_cli.batch.pace import Pace, request_size

    silence = Silence(answered=4, per_image=0.15)
    server = StandIn(answer=silence)
    try:
        client = ChatServer(server.url, "medgemma.gguf", timeout=30.0, retries=0, check_every=0.2)
        client.pace = Pace(safety=2.0, floor_s=0.05)
        for _ in range(3):
            client.chat(image_chat(1), max_tokens=4)
        one_image_bound = client.pace.limit(request_size(1, len("Findings?"), 4, 256), 30.0).seconds
        t0 = time.monotonic()
        big = client.chat(image_chat(12), max_tokens=4)
        took = time.monotonic() - t0
        assert big.answer == "Normal." and took > one_image_bound  # a size-blind bound would have cut it
        t0 = time.monotonic()
        with pytest.raises(ServerError, match=r"12 image\(s\)"):
            client.chat(image_chat(12), max_tokens=4)
        waited = time.monotonic() - t0
    finally:
        silence.release.set()
        server.stop()
    assert took < waited < 15, (took, waited)


def test_before_any_answer_only_the_timeout_applies():
    """Nothing measured yet (a first question, or a model still loading): no bound but --timeout, and a timeout
    is not asked again at once."""
    from medgemma_cli.batch.pace import Pace

    silence = Silence(answered=0)
    server = StandIn(answer=silence)
    try:
        client = ChatServer(server.url, "medgemma.gguf", timeout=1.5, check_every=0.2)
        client.pace = Pace(floor_s=0.01)
        t0 = time.monotonic()
        with pytest.raises(ServerError, match=r"no answer from .* within 1.5 s \(--timeout\)"):
            client.chat(image_chat(1), max_tokens=4)
        waited = time.monotonic() - t0
    finally:
        silence.release.set()
        server.stop()
    assert 1.5 <= waited < 4 and silence.seen == 1


def test_a_question_sent_before_any_answer_is_bounded_once_another_worker_gets_one():
    """Workers share one client: the first questions of a run leave before anything is measured, and a silent
    one among them is cut once another worker's answer says how long it should take."""
    from medgemma_cli.batch.pace import Pace

    first = threading.Event()

    def answer(body):
        if not first.is_set():  # the first request: never answered
            first.set()
            time.sleep(30)
            return 503, {"error": {"message": "late"}}
        return 200, StandIn.reply("Normal.")

    server = StandIn(answer=answer)
    outcome: list = []
    try:
        client = ChatServer(server.url, "medgemma.gguf", timeout=30.0, retries=0, check_every=0.2)
        client.pace = Pace(sharing=2, floor_s=0.3)

        def silent_one():
            try:
                client.chat(image_chat(1), max_tokens=4)
            except ServerError as e:
                outcome.append(e)

        t0 = time.monotonic()
        worker = threading.Thread(target=silent_one)
        worker.start()
        assert first.wait(5)
        client.chat(image_chat(1), max_tokens=4)
        worker.join(20)
        waited = time.monotonic() - t0
    finally:
        server.stop()
    assert waited < 5 and len(outcome) == 1 and "2 request(s) sharing" in str(outcome[0]), (waited, outcome)


def test_a_batch_records_a_cut_question_as_retryable_and_the_next_run_answers_it(tmp_path, monkeypatch):
    """End to end: the cut question is a retryable record (its message names the slots the server shares), the
    answers before it stay, and the same command run again asks it again. (--max-tokens 4: the bound counts the
    longest answer allowed, at the speed the short answers before it were written.)"""
    from medgemma_cli.batch import pace

    monkeypatch.setattr(pace, "FLOOR_S", 0.3)
    root = pictures(tmp_path / "imgs", 3)
    silence = Silence(answered=2)
    server = StandIn(props=llama_props(8192, 3), answer=silence)
    out = tmp_path / "r.jsonl"
    try:
        t0 = time.monotonic()
        first = run_batch(root, ["Findings?"], out, server=ServerOptions(server.url, image_size=32, timeout=60),
                          options=AskOptions(max_tokens=4))
        took = time.monotonic() - t0
        rs = records(out)
        assert took < 20 and first.to_retry == 1 and len(rs) == 3, took
        (cut,) = [r for r in rs if r["error"]]
        assert cut["retryable"] is True and "predict" in cut["error"] and "3 request(s) sharing" in cut["error"]

        silence.answered = 10 ** 6
        again = run_batch(root, ["Findings?"], out, server=ServerOptions(server.url, image_size=32, timeout=60),
                          options=AskOptions(max_tokens=4))
    finally:
        silence.release.set()
        server.stop()
    assert again.retrying == 1 and again.records_written == 1
    assert all(r["error"] is None for r in records(out))


def test_llama_servers_timings_split_the_wall_time():
    """llama.cpp's server says how long it spent on the prompt and on writing (`timings`): an answer that spent
    nine tenths on the prompt predicts a ten times longer answer to take 1.9 times as long, not 5.5 (each part
    given the whole time, as for a server that does not say)."""
    from medgemma_cli.batch.pace import request_size

    def answer(body):
        return 200, {**StandIn.reply("Normal."), "timings": {"prompt_ms": 900.0, "predicted_ms": 100.0}}

    server = StandIn(answer=answer)
    try:
        client = ChatServer(server.url, "medgemma.gguf")
        client.chat(image_chat(1), max_tokens=4)  # the stand-in's usage: 4 tokens written
    finally:
        server.stop()
    short, long = (client.pace.expected(request_size(1, len("Findings?"), n, 256)) for n in (4, 40))
    assert short is not None and long is not None and long / short == pytest.approx(1.9)


def test_a_prompt_the_server_may_have_cached_teaches_no_prompt_speed():
    """A later question about a unit already sent, or one the server says it read partly from its cache
    (vLLM's usage.prompt_tokens_details, llama.cpp's timings.cache_n), answers in a blink: taken as the server's
    prompt speed, an 85-slice unit would then be expected in a second and cut long before it could be read."""
    from medgemma_cli.batch.pace import request_size

    client = ChatServer("http://127.0.0.1:9", "medgemma.gguf")  # nothing is sent
    one, volume = request_size(1, 100, 4, 256), request_size(85, 100, 4, 256)
    assert client._first_send("unit-a") and not client._first_send("unit-a") and client._first_send("unit-b")
    client._measured(one, StandIn.reply("x"), "x", 4, 2.0)  # a fresh prompt: 357 tokens in at most 2 s
    before = client.pace.expected(volume)
    client._measured(one, StandIn.reply("x"), "x", 4, 0.02, sent_before=True)
    cached = {**StandIn.reply("x"), "usage": {"prompt_tokens": 300, "completion_tokens": 4,
                                               "prompt_tokens_details": {"cached_tokens": 280}}}
    client._measured(one, cached, "x", 4, 0.02)
    reused = {**StandIn.reply("x"), "timings": {"prompt_ms": 1.0, "predicted_ms": 19.0, "cache_n": 270}}
    client._measured(one, reused, "x", 4, 0.02)
    assert before is not None and client.pace.expected(volume) > 0.9 * before
