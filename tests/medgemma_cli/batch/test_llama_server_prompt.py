"""`batch --server` against llama.cpp's own server sends the local prompt: same tokens, same greedy answers.

The server here is a stand-in for `llama-server` speaking its documented /props, /v1/models and native
/completion protocol (tools/server/README.md), answered by llama.cpp through our Engine the way llama-server
answers: the prompt string is tokenized whole by libmtmd with BOS in front (the GGUF's add_bos_token), its
media markers (the server's own, from /props) replaced by the base64 images in order, then greedy decoding.
Why a stand-in and not a built llama-server: see the README's "Tests" section."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from folders import ct_series
from medgemma_cli.answering import AskOptions
from medgemma_cli.batch import ServerOptions, run_batch
from pictures import picture

pytestmark = [pytest.mark.slow, pytest.mark.uses_network]

MARKER = "<__media_0123456789abcdef__>"  # newer llama-servers name a marker of their own in /props


class LlamaServerStandIn:
    def __init__(self, model_dir, n_ctx: int = 4096):
        from medgemma_cli.llama.engine import Engine
        from medgemma_cli.llama.model_files import resolve_model

        self.engine = Engine(resolve_model(model_dir, None, None), n_ctx=n_ctx)
        self.lock = threading.Lock()
        self.prompts: list[str] = []
        self.chat_requests = 0
        props = {"default_generation_settings": {"id": 0, "n_ctx": n_ctx, "params": {}}, "total_slots": 1,
                 "model_path": str(model_dir / "text.gguf"), "media_marker": MARKER, "modalities": {"vision": True},
                 "chat_template": self.engine.llm.metadata["tokenizer.chat_template"]}
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                if self.path == "/props":
                    self._send(200, props)
                elif self.path == "/v1/models":
                    self._send(200, {"data": [{"id": "text.gguf", "meta": {"n_params": 1234, "size": 5678}}]})
                else:
                    self._send(404, {"error": {"code": 404, "message": "File Not Found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/completion":
                    stand_in.chat_requests += 1
                    self._send(500, {"error": {"code": 500, "message": "not in this stand-in"}})
                    return
                with stand_in.lock:
                    self._send(200, stand_in.complete(body))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def complete(self, body: dict) -> dict:
        from medgemma_cli.llama.embeddings import split_at_images
        from medgemma_cli.llama.engine import Chunks, Timings

        prompt = body["prompt"]
        text, data = (prompt["prompt_string"], prompt["multimodal_data"]) if isinstance(prompt, dict) else (prompt, [])
        self.prompts.append(text)
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in data]
        e = self.engine
        # split at the markers as libmtmd does (BOS: add_special); the images encoded as the local run's are
        parts = split_at_images(e.bos + text, MARKER, len(images), e.image_tokens, e.tokenize)
        chunks = Chunks(parts, images)
        e.reset()
        try:
            e.prefill(chunks, Timings())
        finally:
            chunks.free()
        out = e.generate(body["n_predict"], body.get("temperature", 0.8), body.get("seed", 0), False, None,
                         Timings(), time.perf_counter())
        return {"content": out.text, "tokens_evaluated": chunks.n_tokens, "tokens_predicted": out.tokens,
                "stop_type": "limit" if out.stopped == "max_tokens" else "eos"}

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.close()


def test_llama_server_gets_the_local_prompt(convert_tiny, tmp_path):
    """Per (unit, question), through llama.cpp's native endpoint: the prompt token count and the greedy answer
    equal the local model's, unit for unit (photos, and a CT series of several slices)."""
    from medgemma_cli.llama.model_files import resolve_model

    model = convert_tiny("Q8_0")
    vision = resolve_model(model, None, None).vision
    assert vision is not None
    root = tmp_path / "scans"
    root.mkdir()
    for i in range(3):
        Image.fromarray(picture(24, 20, 50 * i)).save(root / f"p{i}.png")
    (root / "ct").mkdir()
    ct_series(root / "ct", 4, "1.2.826.0.1.3680043.99.7")
    questions = ["Any findings?", "Is there an effusion?"]
    opts = AskOptions(max_tokens=12)
    local = tmp_path / "local.jsonl"
    run_batch(root, questions, local, model=model, options=opts)
    server = LlamaServerStandIn(model)
    try:
        remote = tmp_path / "remote.jsonl"
        s = run_batch(root, questions, remote, options=opts,
                      server=ServerOptions(server.url, workers=2, image_size=vision["image_size"],
                                           image_tokens=vision["image_tokens"]))
    finally:
        server.stop()
    assert s.failed == 0 and server.chat_requests == 0 and len(server.prompts) == 8
    assert all(MARKER in p for p in server.prompts) and not any("<bos>" in p for p in server.prompts)

    def by_unit(path):
        return {(tuple(r["files"]), r["question"]): (r["tokens"]["prompt"], r["answer"], r["images_sent"])
                for r in map(json.loads, path.read_text().splitlines())}

    here, there = by_unit(local), by_unit(remote)
    assert len(here) == 8 and here == there
    assert {n for _, _, n in here.values()} == {1, 4}


LLAMA_SERVER_ENV = "MEDGEMMA_TEST_LLAMA_SERVER"  # a llama-server binary built from llama-cpp-python's vendor/llama.cpp


@pytest.fixture
def real_llama_server(convert_tiny, tmp_path):
    """llama.cpp's own llama-server (where $MEDGEMMA_TEST_LLAMA_SERVER names one) with the tiny model, 2 slots."""
    import os
    import subprocess
    import urllib.request

    from ports import free_port

    binary = os.environ.get(LLAMA_SERVER_ENV)
    if not binary:
        pytest.skip(f"${LLAMA_SERVER_ENV} names no llama-server binary (README, Tests)")
    model = convert_tiny("Q8_0")
    port = free_port()
    log_path = tmp_path / "llama-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, "-m", str(model / "text.gguf"), "--mmproj", str(model / "mmproj.gguf"),
                                 "--host", "127.0.0.1", "--port", str(port), "-c", "8192", "--parallel", "2",
                                 "-t", "2", "--no-warmup"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("llama-server did not start:\n" + log_path.read_text()[-3000:])
        time.sleep(0.3)
    yield {"url": url, "model": model, "proc": proc}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_real_llama_server_answers_as_the_local_model(real_llama_server, tmp_path):
    """The same check against a real llama-server: per (unit, question) the prompt tokens and the greedy answer
    equal the local model's (local images through libmtmd, as the server encodes them)."""
    from medgemma_cli.llama.model_files import resolve_model

    model = real_llama_server["model"]
    vision = resolve_model(model, None, None).vision
    assert vision is not None
    root = tmp_path / "scans"
    root.mkdir()
    for i in range(3):
        Image.fromarray(picture(24, 20, 50 * i)).save(root / f"p{i}.png")
    (root / "ct").mkdir()
    ct_series(root / "ct", 4, "1.2.826.0.1.3680043.99.7")
    questions = ["Any findings?", "Is there an effusion?"]
    local = tmp_path / "local.jsonl"
    run_batch(root, questions, local, model=model, options=AskOptions(max_tokens=12, vision_backend="mtmd"))
    remote = tmp_path / "remote.jsonl"
    s = run_batch(root, questions, remote, options=AskOptions(max_tokens=12),
                  server=ServerOptions(real_llama_server["url"], workers=2, image_size=vision["image_size"],
                                       image_tokens=vision["image_tokens"]))
    import urllib.request

    with urllib.request.urlopen(real_llama_server["url"] + "/props", timeout=10) as r:
        per_slot = json.loads(r.read())["default_generation_settings"]["n_ctx"]
    assert s.failed == 0 and s.context == per_slot <= 8192  # planned for what one slot holds

    def by_unit(path):
        return {(tuple(r["files"]), r["question"]): (r["tokens"]["prompt"], r["answer"], r["images_sent"])
                for r in map(json.loads, path.read_text().splitlines())}

    here, there = by_unit(local), by_unit(remote)
    assert len(here) == 8
    assert {k: v[0] for k, v in there.items()} == {k: v[0] for k, v in here.items()}  # prompt tokens
    assert there == here  # and the greedy answers
