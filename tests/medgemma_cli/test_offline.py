"""Offline, proven at the system-call level: every command that needs no network runs under strace and makes
no socket call of any family, and no dependency writes telemetry into the user's home."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medgemma_cli import offline
from pictures import picture

pytestmark = pytest.mark.slow

CT = get_testdata_file("CT_small.dcm", download=False)
SOCKET_CALLS = "socket,socketpair,connect,bind,sendto,sendmsg,listen,accept,accept4"



@pytest.fixture(scope="module")
def strace() -> str:
    path = shutil.which("strace")
    if path is None:
        pytest.skip("strace is not installed (apt-get install strace; CI installs it)")
    probe = subprocess.run([path, "-f", "-qq", "-e", "trace=socket", "-o", os.devnull, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here: {probe.stderr.decode(errors='replace').strip()}")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("offline-inputs")
    (root / "scans").mkdir()
    Image.fromarray(picture(24, 24, 90)).save(root / "scans" / "a.png")
    (root / "scans" / "b.dcm").write_bytes(Path(CT).read_bytes())
    (root / "note.txt").write_text("Cough for three days.\n")
    return root


def traced(strace: str, tmp_path: Path, *args: str, stdin: str | None = None) -> tuple[subprocess.CompletedProcess,
                                                                                          list[str], list[Path]]:
    """Run `medgemma ARGS` under strace with a home of its own; return the socket calls and the files written
    under ~/.cache and ~/.config (where telemetry would go)."""
    home = tmp_path / "user-home"
    home.mkdir(exist_ok=True)
    log = tmp_path / "strace.log"
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
           "XDG_CONFIG_HOME": str(home / ".config"), "MEDGEMMA_HOME": str(tmp_path / "store")}
    env.pop("ORT_DISABLE_TELEMETRY", None)  # the tool must switch it off itself
    env.pop("ORT_TELEMETRY_DISABLED", None)
    r = subprocess.run([strace, "-f", "-qq", "-e", f"trace={SOCKET_CALLS}", "-o", str(log),
                        sys.executable, "-m", "medgemma_cli", *args], input=stdin, capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    calls = [ln for ln in log.read_text().splitlines() if ln.strip() and "---" not in ln and "+++" not in ln]
    written = [p for d in (home / ".cache", home / ".config") if d.exists() for p in d.rglob("*") if p.is_file()]
    return r, calls, written


@pytest.fixture(scope="module")
def models(convert_tiny, siglip_ckpt, tmp_path_factory) -> dict[str, Path]:
    from medgemma_cli.conversion import convert

    root = tmp_path_factory.mktemp("offline-models")
    return {"gguf": convert_tiny("Q8_0"), "siglip": convert(siglip_ckpt, root / "siglip", preset="int8").path}


def _commands(models: dict[str, Path], inputs: Path, siglip_ckpt: Path, out: Path) -> dict[str, tuple[list[str],
                                                                                                         str | None]]:
    gguf, sig = str(models["gguf"]), str(models["siglip"])
    scans, note, png = str(inputs / "scans"), str(inputs / "note.txt"), str(inputs / "scans" / "a.png")
    return {
        "help": (["--help"], None),
        "models": (["models"], None),
        "doctor": (["doctor", "--json"], None),
        "convert": (["convert", str(siglip_ckpt), "--out", str(out / "converted"), "--quant", "int8"], None),
        "ask": (["ask", "What is shown?", CT, note, "--model", gguf, "--max-tokens", "4", "--vision-backend", "onnx"],
                None),
        "chat": (["chat", png, "--model", gguf, "--max-tokens", "4"], "Any finding?\n/quit\n"),
        "batch": (["batch", scans, "-q", "Any finding?", "--out", str(out / "r.jsonl"), "--model", gguf,
                   "--max-tokens", "4", "--classify", "effusion", "--siglip-model", sig, "--quiet"], None),
        "classify": (["classify", png, "--labels", "effusion", "--labels", "normal", "--model", sig], None),
        "embed": (["embed", png, "--out", str(out / "e.npz"), "--model", sig], None),
        "bench": (["bench", "--shape", "tiny", "--threads", "1", "--prompt-tokens", "8", "--decode-tokens", "2",
                   "--json"], None),
        "demo": (["demo"], None),
    }


@pytest.mark.parametrize("command", ["help", "models", "doctor", "convert", "ask", "chat", "batch", "classify",
                                     "embed", "bench", "demo"])
def test_offline_commands_make_no_socket_call(strace, models, inputs, siglip_ckpt, tmp_path, command):
    args, stdin = _commands(models, inputs, siglip_ckpt, tmp_path)[command]
    r, calls, written = traced(strace, tmp_path, *args, stdin=stdin)
    assert r.returncode == 0, r.stderr[-2000:]
    assert calls == [], "\n".join(calls[:10])
    assert written == [], written  # no telemetry device id, no event database


def test_the_guard_refuses_a_socket_and_names_the_command(tmp_path):
    """The audit hook itself: in an offline command, code that opens a socket gets a clear error."""
    code = ("from medgemma_cli.offline import forbid_sockets, NetworkUseError\n"
            "import socket\n"
            "forbid_sockets('ask')\n"
            "try:\n"
            "    socket.create_connection(('127.0.0.1', 9))\n"
            "except NetworkUseError as e:\n"
            "    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "refused" in r.stdout and "medgemma ask" in r.stdout


def test_only_batch_with_a_server_is_online():
    assert offline.is_offline(["ask", "q", "x.png"]) == (True, "ask")
    assert offline.is_offline(["batch", "d", "--out", "r.jsonl"]) == (True, "batch")
    assert offline.is_offline(["batch", "d", "--server", "http://127.0.0.1:8080"])[0] is False
    assert offline.is_offline(["batch", "d", "--server=http://127.0.0.1:8080"])[0] is False
    assert offline.is_offline([]) == (True, "--help")


@pytest.mark.uses_network  # the check is switched on by hand below, around one call
def test_the_suite_fails_a_test_whose_code_makes_a_socket():
    """The session-wide audit hook (tests/conftest.py) sees a socket made by our code and says where."""
    from medgemma_cli.batch.remote import ChatServer
    from medgemma_cli.errors import MedgemmaError

    suite = next(m for m in list(sys.modules.values())
                 if getattr(m, "__file__", "") and Path(m.__file__).name == "conftest.py" and hasattr(m, "_socket_use"))
    suite._socket_use.clear()
    suite._watching[0] = True
    try:
        with pytest.raises(MedgemmaError):
            ChatServer("http://127.0.0.1:9/v1", timeout=2).resolve_model()  # nothing listens on port 9
    finally:
        suite._watching[0] = False
    seen, suite._socket_use[:] = list(suite._socket_use), []
    assert any(s.startswith(("socket.__new__", "socket.connect")) and "remote.py" in s for s in seen), seen
