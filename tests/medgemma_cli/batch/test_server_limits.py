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
                self._send(*stand_in.answer(body))

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
