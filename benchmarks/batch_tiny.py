"""Benchmark: `medgemma batch` on 200 units with the tiny synthetic model.

Local mode: wall time of the whole run (walk, grouping, rendering, records, thumbnails, model load) against
the sum of the time spent inside the model (image encode, prefill, decode). The goal is an overhead of at
most 10 %. The model runs in a worker process (so a llama.cpp crash costs one unit): what that process costs
beyond the model (its start and imports, pickling units and answers through pipes) is reported apart
(goal: at most 2 % of model time). Server mode: the same folder sent to llama-cpp-python's server on 127.0.0.1
with 1, 2 and 4 workers (units/s).

    python benchmarks/batch_tiny.py --work DIR [--units 200] [--skip-server]
    python benchmarks/batch_tiny.py --smoke      # 4 units, one repeat, in seconds; its figures mean nothing

The folder holds single-slice CT series (pydicom's CT_small.dcm with fresh UIDs) and 512×512 PNG photos,
half each; every unit gets two questions. Each local figure is the median of interleaved repeats, with llama.cpp
on 2 threads and on 1 (leaving a core to the rendering thread).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import smoke

QUESTIONS = ["Any acute findings?", "Is there a pleural effusion?"]


def make_folder(root: Path, n: int, photos_only: bool = False) -> None:
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    if root.is_dir() and len(list(root.iterdir())) == n:
        return
    root.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    rng = np.random.default_rng(0)
    for i in range(n):
        if i % 2 == 0 and not photos_only:
            ds = copy.deepcopy(base)
            ds.SeriesInstanceUID = f"1.2.826.0.1.3680043.77.{i}"
            ds.SOPInstanceUID = f"1.2.826.0.1.3680043.77.{i}.1"
            ds.save_as(root / f"ct{i:04d}.dcm")
        else:
            Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(root / f"photo{i:04d}.png")


def tiny_model(work: Path, sliding_window: int | None = None) -> Path:
    from medgemma_cli.conversion import convert
    from medgemma_cli.synthetic import make_checkpoint

    tag = f"-swa{sliding_window}" if sliding_window else ""
    out = work / f"tiny-q8_0{tag}"
    if not (out / "manifest.json").is_file():
        ckpt = work / f"tiny-ckpt{tag}"
        if not (ckpt / "config.json").is_file():
            make_checkpoint(ckpt, "tiny", sliding_window=sliding_window)
        convert(ckpt, out, preset="Q8_0", vision_onnx="none", overwrite=True)
    return out


def local(folder: Path, model: Path, out: Path, threads: int, max_tokens: int) -> dict:
    from medgemma_cli.answering import AskOptions
    from medgemma_cli.batch import run_batch

    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    s = run_batch(folder, QUESTIONS, out, model=model,
                  options=AskOptions(max_tokens=max_tokens, threads=threads, vision_backend="mtmd"))
    wall = time.perf_counter() - t0
    return {"mode": "local", "units": s.units, "records": s.records_written, "wall_s": round(wall, 3),
            "model_s": round(s.model_seconds, 3), "overhead": round(wall / s.model_seconds - 1, 4),
            "worker_s": round(s.worker_seconds, 3), "worker_share": round(s.worker_seconds / s.model_seconds, 4),
            "worker_idle_s": round(s.worker_idle_seconds, 3),
            "units_per_s": round(s.units / wall, 1)}


def bare(folder: Path, model: Path, threads: int, max_tokens: int) -> dict:
    """The model alone: every unit's inputs rendered beforehand, then only encode, prefill and decode are timed."""
    from medgemma_cli.batch.units import make_units
    from medgemma_cli.inputs.collect import collect
    from medgemma_cli.inputs.walk import IMAGE_INPUTS, walk
    from medgemma_cli.llama.engine import Engine
    from medgemma_cli.llama.model_files import resolve_model
    from medgemma_cli.llama.session import PrefixSession

    files = resolve_model(model)
    units = make_units(folder, walk(folder, IMAGE_INPUTS).files, "series")
    inputs = [collect(u.files, files.vision["image_size"]) for u in units]
    engine = Engine(files, n_ctx=8192, threads=threads, vision_backend="mtmd")
    t0 = time.perf_counter()
    for inp in inputs:
        session = PrefixSession(engine, inp)
        session.start()
        for q in QUESTIONS:
            session.ask(q, max_tokens)
    seconds = time.perf_counter() - t0
    engine.close()
    return {"mode": "model alone", "units": len(units), "model_s": round(seconds, 3)}


def server(folder: Path, model: Path, out_dir: Path, max_tokens: int, workers: list[int], threads: int) -> list[dict]:
    from medgemma_cli.answering import AskOptions
    from medgemma_cli.batch import ServerOptions, run_batch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = ("from medgemma_cli.llama.loader import apply_to_process; apply_to_process(); import runpy; "
             "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen([sys.executable, "-c", serve, "--model", str(model / "text.gguf"),
                             "--clip_model_path", str(model / "mmproj.gguf"), "--chat_format", "mtmd",
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                             "--n_threads", str(threads)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                time.sleep(0.2)
        rows = []
        manifest = json.loads((model / "manifest.json").read_text())
        for w in workers:
            out = out_dir / f"server-w{w}.jsonl"
            out.unlink(missing_ok=True)
            t0 = time.perf_counter()
            s = run_batch(folder, QUESTIONS[:1], out, options=AskOptions(max_tokens=max_tokens),
                          server=ServerOptions(url, workers=w, image_size=manifest["image_size"],
                                               image_tokens=manifest["image_tokens"]))
            wall = time.perf_counter() - t0
            rows.append({"mode": "server", "workers": w, "units": s.units, "records": s.records_written,
                         "failed": s.failed, "wall_s": round(wall, 3), "units_per_s": round(s.units / wall, 1),
                         "requests_per_s": round(s.records_written / wall, 1)})
        return rows
    finally:
        proc.terminate()
        proc.wait(10)


def summarise(rows: list[dict], key: str) -> dict:
    values = sorted(r[key] for r in rows)
    return {"min": values[0], "median": values[len(values) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smoke.add_arguments(ap)
    ap.add_argument("--units", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="llama.cpp threads of the local runs")
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--skip-local", action="store_true")
    args = smoke.parse(ap, units=4, max_tokens=4, repeats=1, threads=[1])
    if args.smoke:
        print(json.dumps({"smoke": smoke.NOTE}), flush=True)
    os.environ.setdefault("MEDGEMMA_HOME", str(args.work / "home"))
    folder = args.work / f"units-{args.units}"
    make_folder(folder, args.units)
    print(json.dumps({"machine_cores": os.cpu_count(), "units": args.units, "questions": len(QUESTIONS),
                      "max_tokens": args.max_tokens, "repeats": args.repeats}), flush=True)
    model = tiny_model(args.work)
    # 2 threads: llama.cpp takes both cores and rendering competes with it; 1 thread: a core is left for rendering
    for threads in () if args.skip_local else args.threads:
        alone, runs = [], []
        for _ in range(args.repeats):  # interleaved, so drifts in the machine's speed hit both alike
            alone.append(bare(folder, model, threads, args.max_tokens))
            runs.append(local(folder, model, args.work / "local.jsonl", threads, args.max_tokens))
        a, w, m = summarise(alone, "model_s"), summarise(runs, "wall_s"), summarise(runs, "model_s")
        print(json.dumps({"threads": threads, "model_alone_s": a, "batch_wall_s": w, "model_in_batch_s": m,
                          "worker_process_s": summarise(runs, "worker_s"),
                          "worker_idle_s": summarise(runs, "worker_idle_s"),
                          "worker_vs_model_in_batch": summarise(runs, "worker_share"),
                          "overhead_vs_model_in_batch": round(w["median"] / m["median"] - 1, 4),
                          "overhead_vs_model_alone": round(w["median"] / a["median"] - 1, 4),
                          "units_per_s": round(args.units / w["median"], 1)}), flush=True)
    if not args.skip_server:
        # PNG units and one question only: for some prompts the random model emits UTF-8 lead bytes forever, and
        # llama-cpp-python's server then ignores max_tokens (it waits for the character to complete) until the
        # context is full and the request fails after ~13 s; those few requests would be all the benchmark measured.
        photos = args.work / f"photos-{args.units}"
        make_folder(photos, args.units, photos_only=True)
        # llama-cpp-python's server needs a sliding window longer than the prompt (see tests/medgemma_cli/test_batch.py)
        served = tiny_model(args.work, sliding_window=512)
        for row in server(photos, served, args.work, args.max_tokens, [1, 2, 4], max(args.threads)):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
