"""The OpenAI-compatible client against small real HTTP servers that misbehave in the ways servers do.

Then `batch --server` end to end against llama-cpp-python's real OpenAI-compatible server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from folders import ct_series
from medgemma_cli.answering import AskOptions
from medgemma_cli.batch import ClassifyOptions, ServerOptions, run_batch
from medgemma_cli.batch.remote import ChatServer, ServerError
from medgemma_cli.errors import MedgemmaError
from pictures import picture
from ports import free_port

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


def test_schema_travels_as_response_format():
    """OpenAI's structured-outputs form first; a server that refuses it (llama-cpp-python's: 422) gets the older
    json_object form, and keeps getting it."""
    schema = {"type": "object", "properties": {"effusion": {"type": "boolean"}}, "required": ["effusion"]}
    reply = {**REPLY, "choices": [{"message": {"content": '{"effusion": false}'}, "finish_reason": "stop"}]}
    httpd, url, seen = serve([(422, b'{"detail": "response_format.type"}'), (200, json.dumps(reply).encode()),
                              (200, json.dumps(reply).encode())])
    try:
        client = ChatServer(url, "medgemma-4b")
        first = client.chat([{"role": "user", "content": "Effusion?"}], max_tokens=8, schema=schema)
        client.chat([{"role": "user", "content": "Effusion?"}], max_tokens=8, schema=schema)
    finally:
        httpd.shutdown()
    assert json.loads(first.answer) == {"effusion": False}
    formats = [s["body"]["response_format"] for s in seen]
    assert formats[0] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    assert formats[1] == formats[2] == {"type": "json_object", "schema": schema}


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
    from medgemma_cli.batch import remote

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


def _server(llama_server, workers: int = 1):

    return ServerOptions(llama_server["url"] + "/v1", workers=workers, image_size=32, image_tokens=4)


@pytest.mark.uses_network
def test_server_batch(messy, llama_server, tmp_path):
    """The same units and records as locally, answered by the server; more workers change nothing but speed."""
    questions = ["Is there a pleural effusion?", "Any findings?"]
    out1 = tmp_path / "w1.jsonl"
    s = run_batch(messy, questions, out1, server=_server(llama_server), options=AskOptions(max_tokens=8))
    records = [json.loads(ln) for ln in out1.read_text().splitlines()]
    assert len(records) == 12 and s.failed == 1 and s.model == llama_server["model"]
    good = [r for r in records if r["error"] is None]
    assert len(good) == 10
    for r in good:
        assert isinstance(r["answer"], str) and r["model"] == llama_server["model"]
        # the images reached the model: 4 embeddings each, plus the text
        assert r["tokens"]["prompt"] >= 4 * r["images_sent"] + 10
    by_files = {tuple(r["files"]): r for r in good if r["question"] == questions[0]}
    assert by_files[("cine/multi.dcm",)]["images_sent"] == 10
    assert next(r for k, r in by_files.items() if len(k) == 6)["images_sent"] == 6
    broken = [r for r in records if r["error"]]
    assert {tuple(r["files"]) for r in broken} == {("broken.dcm",)}

    out3 = tmp_path / "w3.jsonl"
    s3 = run_batch(messy, questions, out3, server=_server(llama_server, workers=3), options=AskOptions(max_tokens=8))
    assert s3.records_written == 12
    # (each results file has its own unit-id key, so units are matched by their files)
    answers = {(tuple(r["files"]), r["question"]): r["answer"] for r in map(json.loads, out1.read_text().splitlines())}
    answers3 = {(tuple(r["files"]), r["question"]): r["answer"]
                for r in map(json.loads, out3.read_text().splitlines())}
    assert answers3 == answers
    assert len({a for (u, q), a in answers.items() if q == questions[0] and a is not None}) >= 2  # images matter
    again = run_batch(messy, questions, out3, server=_server(llama_server, workers=3), options=AskOptions(max_tokens=8))
    assert again.records_written == 0 and again.done_before == 12


@pytest.mark.uses_network
def test_server_with_classify(messy, llama_server, siglip_fp32, tmp_path):
    """MedSigLIP runs here while the server answers; its probabilities reach every record of the unit."""

    out = tmp_path / "r.jsonl"
    run_batch(messy, ["Findings?", "Size?"], out, server=_server(llama_server, workers=2),
              options=AskOptions(max_tokens=4), classify=ClassifyOptions(["effusion", "normal"], siglip_fp32))
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    good = [r for r in records if r["error"] is None]
    assert len(good) == 10 and all(r["classify"]["images"] == r["images_sent"] for r in good)
    by_unit: dict[str, list] = {}
    for r in good:
        by_unit.setdefault(r["unit"], []).append(r["classify"])
    assert all(len(v) == 2 and v[0] == v[1] for v in by_unit.values())  # one scoring per unit, on both records


@pytest.mark.uses_network
def test_server_refusal_becomes_error_records(tmp_path, llama_server):
    """A request the server refuses (here: longer than its context) is an error record; the rest go on."""
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.fromarray(picture(20, 20, 40 * i)).save(root / f"i{i}.png")
    out = tmp_path / "r.jsonl"
    too_long = "Describe " * 2500 + "?"
    s = run_batch(root, ["Findings?", too_long], out, server=_server(llama_server, workers=2),
                  options=AskOptions(max_tokens=4))
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(records) == 6 and s.failed == 3
    errors = [r for r in records if r["error"]]
    assert len(errors) == 3 and all(r["question"] == too_long for r in errors)
    assert all("500" in r["error"] and "n_ctx" in r["error"] for r in errors), errors[0]["error"]


@pytest.mark.uses_network
def test_server_cli_sends_no_phi(tmp_path, llama_server):
    """Through the CLI with 2 workers and a report: the server never sees patient names, IDs or dates (its
    verbose log prints every prompt), even when the records keep them on request."""
    root = tmp_path / "phi"
    root.mkdir()
    ct_series(root, 3, "1.2.826.0.1.3680043.99.8", phi=True)
    env = {**os.environ, "MEDGEMMA_HOME": str(tmp_path / "home")}
    out = tmp_path / "r.jsonl"
    before = llama_server["log"].stat().st_size
    cmd = [sys.executable, "-m", "medgemma_cli", "batch", str(root), "-q", "Findings?", "-q", "Size?",
           "--out", str(out), "--server", llama_server["url"], "--workers", "2", "--image-size", "32",
           "--max-tokens", "4", "--include-phi", "--with-metadata",
           "--report", str(tmp_path / "review.html"), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Roe^Richard" in out.read_text()  # kept in the records, as asked
    with open(llama_server["log"], "rb") as f:
        f.seek(before)
        seen = f.read().decode("utf-8", "replace")
    assert "Findings?" in seen and "Size?" in seen  # the log does show the prompts
    assert "Roe" not in seen and "424242" not in seen and "20240102" not in seen
    assert (tmp_path / "review.html").is_file()


@pytest.mark.uses_network
def test_server_unreachable_is_one_line(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a.png")
    out = tmp_path / "r.jsonl"
    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "batch", str(root), "-q", "x", "--out", str(out),
                        "--server", f"http://127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MEDGEMMA_HOME": str(tmp_path / "home")})
    assert r.returncode == 1 and "cannot reach" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    r = subprocess.run([sys.executable, "-m", "medgemma_cli", "batch", str(root), "-q", "x", "--out", str(out),
                        "--workers", "2"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MEDGEMMA_HOME": str(tmp_path / "home")})
    assert r.returncode != 0 and "--server" in r.stderr and not out.exists()


@pytest.mark.uses_network
def test_server_batch_with_schema(tmp_path, llama_server):
    """The server's own grammar (from the response_format) makes the tiny model write the schema's JSON."""
    jsonschema = pytest.importorskip("jsonschema")
    root = tmp_path / "scans"
    root.mkdir()
    Image.fromarray(picture(20, 30, 90)).save(root / "p.png")
    schema = {"type": "object", "required": ["effusion"], "properties": {"effusion": {"type": "boolean"}}}
    out = tmp_path / "r.jsonl"
    s = run_batch(root, ["Effusion?"], out, server=_server(llama_server),
                  options=AskOptions(max_tokens=40, schema=schema))
    record = json.loads(out.read_text())
    assert s.failed == 0 and record["error"] is None, record["error"]
    jsonschema.validate(record["parsed"], schema)
