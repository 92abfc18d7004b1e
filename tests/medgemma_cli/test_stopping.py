"""Ctrl-C and SIGTERM stop `ask` and `extract labs` promptly even while the main thread is inside ONNX Runtime or
llama.cpp, with the usual exit (130, 143), one line on stderr and nothing left behind.

The slow native work is made here, not borrowed from a big model: a vision.onnx that is a chain of thousands of
1024×1024 matrix products (minutes of ONNX Runtime's time), and for llama.cpp the test-only
MEDGEMMA_TEST_SLOW_NODES_MS, which makes every graph node of a prompt's decode sleep in native code. Uninterrupted,
either takes many minutes, so the bound below means "it did not wait for the work" without timing anything."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgemma_cli import containment
from medgemma_cli.llama.engine import SLOW_NODES_TEST_ENV
from pictures import picture

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the child's stage via /proc")]

STOP_BOUND_S = 60  # the work stopped takes many minutes; a stop waits for one graph node at most


@pytest.fixture(scope="module")
def model(convert_tiny) -> Path:
    return convert_tiny("Q8_0")


@pytest.fixture(scope="module")
def heavy_model(model, tmp_path_factory) -> Path:
    """The tiny model with a vision.onnx that takes many minutes per image (its output has the right shape)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path_factory.mktemp("heavy") / "model"
    shutil.copytree(model, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    import onnxruntime as ort
    size = int(manifest["image_size"])
    original = ort.InferenceSession(str(model / "vision.onnx"), providers=["CPUExecutionProvider"])
    _, tokens, width = original.run(None, {"pixel_values": np.zeros((1, 3, size, size), np.float32)})[0].shape
    n, steps = 1024, 4000
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    nodes = [helper.make_node("ReduceMean", ["pixel_values"], ["m"], keepdims=0),
             helper.make_node("Expand", ["m", "square"], ["x0"])]
    for i in range(steps):
        nodes.append(helper.make_node("MatMul", [f"x{i}", "w"], [f"x{i + 1}"]))
    nodes += [helper.make_node("ReduceMean", [f"x{steps}"], ["r"], keepdims=0),
              helper.make_node("Expand", ["r", "out_shape"], ["image_embeddings"])]
    graph = helper.make_graph(
        nodes, "heavy", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1, 3, None, None])],
        [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT, [1, tokens, width])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([n, n], np.int64), "square"),
         numpy_helper.from_array(np.array([1, tokens, width], np.int64), "out_shape")])
    path = folder / "vision.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    data = path.read_bytes()
    manifest["files"]["vision.onnx"] = {**manifest["files"]["vision.onnx"], "size": len(data),
                                        "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / ".verified.json").unlink(missing_ok=True)
    return folder


def _child_stage_file(parent: int, deadline: float) -> str:
    """The stage file of the supervised child of `parent` (the parent names it in the child's environment)."""
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
            for child in children:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                for item in env:
                    if item.startswith(containment.STAGE_FILE_ENV.encode() + b"="):
                        return item.split(b"=", 1)[1].decode()
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("the supervised child never started")


def stop_midway(args: list[str], home: Path, doing: str, sig: signal.Signals,
                extra_env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    """Run `medgemma ARGS` in a session of its own, send `sig` once its stage says `doing` (SIGINT to the whole
    process group, as a terminal's Ctrl-C does; SIGTERM to `medgemma` alone, as `kill` does) and wait for it.
    Returns the exit code, stdout, stderr and the seconds from the signal to the exit."""
    tmp = home / "tmp"
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "MEDGEMMA_HOME": str(home), "COLUMNS": "200", "TMPDIR": str(tmp), **(extra_env or {})}
    env.pop(containment.TEST_CRASH_ENV, None)
    p = subprocess.Popen([sys.executable, "-m", "medgemma_cli", *args], env=env, cwd=home, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        stage_file = _child_stage_file(p.pid, deadline)
        while (containment.read_stage(stage_file) or ("", ""))[1] != doing:
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, f"never got to {doing!r}"
            time.sleep(0.05)
        time.sleep(1.0)  # well inside the native call
        t0 = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        out, err = p.communicate(timeout=STOP_BOUND_S)
        return p.returncode, out, err, time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _assert_clean_stop(rc: int, out: str, err: str, sig: signal.Signals, home: Path) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    expected = ("interrupted; nothing was left half-written" if sig == signal.SIGINT
                else "stopped (SIGTERM); nothing was left half-written")
    assert rc == 128 + sig, err
    assert lines == [expected], err
    assert "Traceback" not in err and out == ""
    assert not list((home / "tmp").iterdir())  # the stage file and any temporary file removed


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_while_encoding_an_image(heavy_model, tmp_path, sig):
    img = tmp_path / "photo.png"
    Image.fromarray(picture(48, 40, 3)).save(img)
    rc, out, err, waited = stop_midway(["ask", "Describe.", str(img), "--model", str(heavy_model), "--json",
                                        "--vision-backend", "onnx", "--threads", "1"],
                                       tmp_path, "encoding image 1", sig)
    _assert_clean_stop(rc, out, err, sig, tmp_path)
    print(f"{sig.name} while encoding: stopped {waited:.2f} s after the signal")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_while_reading_the_prompt(model, tmp_path, sig):
    note = tmp_path / "note.txt"
    note.write_text("Fever and cough for three days. " * 40)
    rc, out, err, waited = stop_midway(["ask", "Summarise.", str(note), "--model", str(model), "--json",
                                        "--threads", "1"], tmp_path, "reading the prompt", sig,
                                       {SLOW_NODES_TEST_ENV: "2000"})
    _assert_clean_stop(rc, out, err, sig, tmp_path)
    print(f"{sig.name} while reading the prompt: stopped {waited:.2f} s after the signal")


def test_stopped_extract_leaves_no_output(model, tmp_path):
    page = tmp_path / "page.png"
    Image.fromarray(picture(64, 48, 5)).save(page)
    out_file = tmp_path / "labs.json"
    rc, _out, err, _ = stop_midway(["extract", "labs", str(page), "--model", str(model), "--out", str(out_file),
                                   "--threads", "1"], tmp_path, "reading the prompt", signal.SIGTERM,
                                  {SLOW_NODES_TEST_ENV: "2000"})
    assert rc == 143 and "Traceback" not in err, err
    assert [ln for ln in err.splitlines() if ln.strip()][-1] == "stopped (SIGTERM); nothing was left half-written"
    assert not out_file.exists() and not list((tmp_path / "tmp").iterdir())


# --- the mechanism, in a process of its own (it installs signal handlers) ---------------------------------------

def _run_script(code: str, model: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(model)], capture_output=True, text=True,
                          timeout=300, env={k: v for k, v in os.environ.items() if not k.startswith("MEDGEMMA_")})


def test_a_stopped_decode_is_raised_as_the_signal_and_abandons_the_context(model):
    r = _run_script("""
        import signal, sys
        from pathlib import Path
        import numpy as np
        from medgemma_cli import stopping
        from medgemma_cli.errors import MedgemmaError
        from medgemma_cli.llama.engine import Engine, Timings
        from medgemma_cli.llama.model_files import resolve_model

        stopping.install()
        engine = Engine(resolve_model(Path(sys.argv[1])), n_ctx=512, threads=1, vision_backend="onnx")
        chunks = engine.chunks(engine.render([{"role": "user", "content": "Hello there, how are you?"}]), [])
        engine.prefill(chunks, Timings())
        print("before", engine.n_past, engine.generate(3).tokens)
        engine.reset()
        stopping.request(signal.SIGTERM)
        try:
            engine.prefill(chunks, Timings())
        except stopping.Terminated as e:
            print("terminated", e.code, engine.abandoned)
        try:
            engine.decode_text("", [5])
        except MedgemmaError as e:
            print("refused:", e)
        try:
            from medgemma_cli import stopping as s
            import onnxruntime as ort
            sess = ort.InferenceSession(str(engine.files.vision_onnx), providers=["CPUExecutionProvider"])
            s.run_onnx(sess, {"pixel_values": np.zeros((1, 3, 32, 32), np.float32)})
        except stopping.Terminated as e:
            print("onnx terminated", e.code)
        """, model)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("before ") and lines[1:] == [
        "terminated 143 True", "refused: a stopped decode left this context unusable", "onnx terminated 143"], r.stdout
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr


def test_a_signal_in_python_code_is_still_raised_at_once(model):
    """Outside native calls the handlers raise as before: Ctrl-C is KeyboardInterrupt, SIGTERM exits 143."""
    r = _run_script("""
        import os, signal, time
        from medgemma_cli import stopping
        stopping.install()
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            print("not raised")
        except KeyboardInterrupt:
            print("interrupt")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        print("not terminated")
        """, model)
    assert r.stdout.splitlines() == ["interrupt"] and r.returncode == 143, (r.stdout, r.stderr)


def test_a_signal_arriving_while_a_hook_is_registered_does_not_hang():
    """The handler runs on the main thread, which may be inside on_stop holding the module's lock: the handler
    taking that lock again must not wait on itself (it did, 15 times in 150, with a plain Lock)."""
    code = textwrap.dedent("""
        import signal
        from medgemma_cli import stopping
        stopping.install()
        seen = []
        try:
            with stopping._lock:  # where on_stop holds it when the signal lands
                stopping._handler(signal.SIGINT, None)
        except KeyboardInterrupt:
            print("interrupt")
        with stopping.on_stop(lambda: seen.append(1)):  # already requested: the hook runs at once
            pass
        print(len(seen))
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["interrupt", "1"], (r.stdout, r.stderr)


def test_a_stop_lost_inside_a_ctypes_callback_is_raised_before_the_next_token(model):
    """A handler raising inside a ctypes callback (llama-cpp-python's log callback) is swallowed by ctypes: the
    generation loop still stops at the next token."""
    r = _run_script("""
        import ctypes, os, signal, sys
        from pathlib import Path
        from medgemma_cli import stopping
        from medgemma_cli.llama.engine import Engine, Timings
        from medgemma_cli.llama.model_files import resolve_model

        stopping.install()
        engine = Engine(resolve_model(Path(sys.argv[1])), n_ctx=512, threads=1, vision_backend="onnx")
        engine.prefill(engine.chunks(engine.render([{"role": "user", "content": "Hello?"}]), []), Timings())
        callback = ctypes.CFUNCTYPE(None)(lambda: os.kill(os.getpid(), signal.SIGTERM))
        callback()  # the handler runs (and raises) inside the callback, where ctypes prints and drops it
        print("still here", flush=True)
        engine.generate(50, stop_at_eos=False)
        print("generated 50 tokens")
        """, model)
    assert r.returncode == 143 and r.stdout.splitlines() == ["still here"], (r.stdout, r.stderr)
