"""The OpenAI-compatible client against small real HTTP servers that misbehave in the ways servers do.

(Answers from a real model server are tested in test_batch.py with llama-cpp-python's server.)"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from medgemma_cli.errors import MedgemmaError
from medgemma_cli.remote import ChatServer, ServerError

pytestmark = pytest.mark.uses_network  # servers started here on 127.0.0.1

REPLY = {"choices": [{"message": {"role": "assistant", "content": " No effusion. "}, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 12, "completion_tokens": 3}}


def serve(statuses: list[tuple[int, bytes]]):
    """An HTTP server answering each POST with the next (status, body); GET /v1/models lists one model."""
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._send(200, json.dumps({"data": [{"id": "medgemma-4b"}]}).encode())

        def do_POST(self):
            seen.append({"body": json.loads(self.rfile.read(int(self.headers["Content-Length"]))),
                         "auth": self.headers.get("Authorization")})
            self._send(*statuses[min(len(seen), len(statuses)) - 1])

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1/", seen


def test_retries_busy_then_answers(monkeypatch):
    monkeypatch.setenv("MEDGEMMA_API_KEY", "secret-key")
    httpd, url, seen = serve([(503, b'{"error": {"message": "busy"}}'), (200, json.dumps(REPLY).encode())])
    try:
        client = ChatServer(url)
        assert client.resolve_model() == "medgemma-4b"
        reply = client.chat([{"role": "user", "content": "Effusion?"}], max_tokens=8)
    finally:
        httpd.shutdown()
    assert reply.answer == "No effusion." and reply.prompt_tokens == 12 and reply.finish_reason == "stop"
    assert len(seen) == 2 and seen[1]["body"]["model"] == "medgemma-4b" and seen[1]["body"]["max_tokens"] == 8
    assert seen[1]["body"]["temperature"] == 0.0 and seen[1]["auth"] == "Bearer secret-key"


def test_refusals_and_garbage_are_server_errors():
    httpd, url, _ = serve([(400, b'{"error": {"message": "context length exceeded"}}'), (200, b"<html>proxy</html>")])
    try:
        client = ChatServer(url, "medgemma-4b")
        with pytest.raises(ServerError, match="answered 400: context length exceeded"):
            client.chat([{"role": "user", "content": "x"}], 4)
        with pytest.raises(ServerError, match="did not answer with JSON"):
            client.chat([{"role": "user", "content": "x"}], 4)
        with pytest.raises(MedgemmaError, match="does not serve 'other'"):
            ChatServer(url, "other").resolve_model()
    finally:
        httpd.shutdown()


def test_silence_is_a_timeout_not_a_retry():
    """A server that accepts and never answers: one clear error after --timeout, not three waits."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        client = ChatServer(f"http://127.0.0.1:{s.getsockname()[1]}", "m", timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(ServerError, match=r"no answer from .* within 1 s"):
            client.chat([{"role": "user", "content": "x"}], 4)
        assert time.monotonic() - t0 < 2.5


def test_url_must_be_http():
    with pytest.raises(MedgemmaError, match="http"):
        ChatServer("ftp://host/v1")
    assert ChatServer("http://h:8080/v1/").base == ChatServer("http://h:8080").base == "http://h:8080"


def _raw_server(handler):
    """A TCP server on 127.0.0.1 whose connections are handled by handler(conn) in a thread each."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            threading.Thread(target=handler, args=(conn, stop), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return srv, stop, f"http://127.0.0.1:{srv.getsockname()[1]}"


def test_a_trickling_reply_ends_at_the_timeout():
    """One byte every 0.1 s keeps each read alive; the whole reply still has to arrive within --timeout."""
    sent = []

    def trickle(conn, stop):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        try:
            for _ in range(300):  # would take 30 s to finish
                if stop.is_set():
                    break
                conn.sendall(b" ")
                sent.append(1)
                time.sleep(0.1)
        except OSError:
            pass
        conn.close()

    srv, stop, url = _raw_server(trickle)
    try:
        with pytest.raises(ServerError, match=r"no whole answer .* within 1 s"):
            ChatServer(url, "m", timeout=1.0).chat([{"role": "user", "content": "x"}], 4)
        assert len(sent) < 300  # the client gave up while the server was still sending
    finally:
        stop.set()
        srv.close()


def test_an_endless_reply_stops_at_the_size_cap():
    from medgemma_cli import remote

    sent = []

    def flood(conn, stop):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n[")
        block = b"0," * (1 << 19)
        try:
            for _ in range(remote.MAX_REPLY_BYTES // len(block) * 4):  # four times the cap, then give up
                if stop.is_set():
                    break
                conn.sendall(block)
                sent.append(len(block))
        except OSError:
            pass
        conn.close()

    srv, stop, url = _raw_server(flood)
    try:
        with pytest.raises(ServerError, match=r"reply over 16 MB"):
            ChatServer(url, "m", timeout=30.0).chat([{"role": "user", "content": "x"}], 4)
        with pytest.raises(ServerError, match=r"reply over 16 MB"):
            ChatServer(url, "m", timeout=30.0).models()
    finally:
        stop.set()
        srv.close()
