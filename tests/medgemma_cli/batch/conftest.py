"""Fixtures of the batch tests: a messy folder of scans, a converted MedSigLIP, and llama-cpp-python's own
OpenAI-compatible server on 127.0.0.1 with a tiny MedGemma."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from folders import messy_folder
from ports import free_port


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    return messy_folder(tmp_path / "night")


@pytest.fixture(scope="module")
def siglip_fp32(siglip_ckpt, tmp_path_factory) -> Path:
    from medgemma_cli.conversion import convert

    return convert(siglip_ckpt, tmp_path_factory.mktemp("siglip-batch") / "fp32", preset="fp32").path


# llama-cpp-python's server, with this machine's extra-buffer verdict applied to its model loads (AMX)
SERVE_WITH_VERDICT = ("from medgemma_cli.llama.loader import apply_to_process; apply_to_process(); import runpy; "
                      "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)")


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """`python -m llama_cpp.server` with a tiny converted MedGemma (text + mmproj, chat format mtmd)."""
    import urllib.request

    from medgemma_cli.conversion import convert
    from medgemma_cli.synthetic import make_checkpoint

    root = tmp_path_factory.mktemp("served")
    # llama-cpp-python's server fails ("failed to find a memory slot") once the prompt outgrows a 16-token
    # sliding window; MedGemma's window is 1024, so the served tiny model gets 512.
    ckpt = make_checkpoint(root / "ckpt", "tiny", sliding_window=512)
    model = convert(ckpt, root / "model", preset="F16", vision_onnx="none").path
    port = free_port()
    log_path = root / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 - the server writes to it until the fixture ends
    proc = subprocess.Popen([sys.executable, "-c", SERVE_WITH_VERDICT, "--model", str(model / "text.gguf"),
                             "--clip_model_path", str(model / "mmproj.gguf"), "--chat_format", "mtmd",
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--verbose", "true"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=2) as r:
                served = json.loads(r.read())["data"][0]["id"]
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the llama-cpp-python server did not start:\n"
                                   + log_path.read_text()[-3000:]) from None
            time.sleep(0.3)
    yield {"url": url, "model": served, "log": log_path}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
