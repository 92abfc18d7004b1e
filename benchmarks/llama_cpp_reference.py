"""The independently produced file our speed benchmarks compare with, and the timed llama.cpp runs.

The reference holds llama.cpp's own tensors (`llama_model_quantize` run over our lossless GGUF) laid out by
gguf-py, llama.cpp's own Python writer, at `general.alignment = 64`: nothing of our layout code is in it, so
a regression in what we write (types, bytes, placement, metadata) shows as a ratio below 1. Its layout is
llama.cpp's best case: the same tensors at 32-byte alignment run at this speed only when the header happens
to end on a cache line (issue 17).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np

REFERENCE_ALIGNMENT = 64
_PADDING_KEY = "medgemma_cli.header_padding"  # ours, copied by llama.cpp's quantizer; not part of the reference


def relay_with_gguf_py(src: Path, dst: Path, alignment: int = REFERENCE_ALIGNMENT) -> None:
    """Write `src`'s key-values and tensors to `dst` with gguf-py's writer at `general.alignment`."""
    r = gguf.GGUFReader(src)
    tmp = dst.with_name(dst.name + ".partial")
    w = gguf.GGUFWriter(tmp, str(r.fields["general.architecture"].contents()))
    w.add_custom_alignment(alignment)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment", _PADDING_KEY):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)
    for t in r.tensors:  # shapes in numpy order: gguf-py reverses them back when it writes
        w.add_tensor_info(t.name, [int(n) for n in reversed(t.shape)], np.dtype(np.float32), int(t.n_bytes),
                          raw_dtype=t.tensor_type)
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    for t in r.tensors:
        f.write(b"\0" * (-f.tell() % alignment))
        f.write(memoryview(np.ascontiguousarray(t.data)).cast("B"))
    f.write(b"\0" * (-f.tell() % alignment))
    w.close()
    tmp.replace(dst)


def reference_gguf(lossless: Path, preset: str, dst: Path, threads: int | None = None) -> Path:
    """llama.cpp's quantization of `lossless` to `preset`, laid out by gguf-py (cached at `dst`)."""
    from medgemma_cli.kernels.llama_quantize import llama_quantize
    from medgemma_cli.kernels.policy import PRESETS

    if dst.is_file():
        return dst
    raw = dst.with_name(dst.name + ".llama-quantize")
    t0 = time.perf_counter()
    llama_quantize(lossless, raw, PRESETS[preset].file_type, threads=threads)
    relay_with_gguf_py(raw, dst)
    raw.unlink()
    print(json.dumps({"reference": dst.name, "s": round(time.perf_counter() - t0, 1)}), flush=True)
    return dst


def layout(path: Path) -> dict[str, Any]:
    """Where the data sits, as ggml reads the file."""
    from medgemma_cli.kernels.ggml import read_gguf_info

    info = read_gguf_info(path, keys={"general.alignment"})
    offsets = [t.offset for t in info.tensors]
    return {"file": path.name, "general.alignment": info.get("general.alignment"), "data_start": min(offsets),
            "data_start_mod_64": min(offsets) % 64, "data_start_mod_4096": min(offsets) % 4096,
            "tensors_off_64": sum(o % 64 != 0 for o in offsets), "tensors": len(offsets)}


def same_tensors(a: Path, b: Path) -> bool:
    """Same names, types and bytes (so a speed difference is the layout's or the metadata's)."""
    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    return ta.keys() == tb.keys() and all(
        ta[k].tensor_type == tb[k].tensor_type and np.array_equal(np.asarray(ta[k].data).view(np.uint8).reshape(-1),
                                                                  np.asarray(tb[k].data).view(np.uint8).reshape(-1))
        for k in ta)


def timed_run(path: Path, extra_buffers: bool, threads: int, prompt_tokens: int, decode_tokens: int) -> dict[str, Any]:
    """Load, read a prompt, decode one token at a time, in a fresh process (nothing cached between runs but
    the page cache); the same token ids for every file."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import llama_cpp_reference as r; "
            f"r._child({str(path)!r}, {extra_buffers}, {threads}, {prompt_tokens}, {decode_tokens})")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"timed run on {path.name} failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _child(path: str, extra_buffers: bool, threads: int, prompt_tokens: int, decode_tokens: int) -> None:
    from llama_cpp import _logger

    from medgemma_cli.llama_loader import buffer_types_used, load_llama

    _logger.set_verbose(False)
    t0 = time.perf_counter()
    with buffer_types_used() as buffers:
        llm = load_llama(path, use_extra_buffers=extra_buffers, n_ctx=prompt_tokens + decode_tokens + 16,
                         n_batch=prompt_tokens, n_threads=threads, n_threads_batch=threads, verbose=False)
    load = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    prompt = [2, *rng.integers(10, 900, prompt_tokens - 1).tolist()]
    t0 = time.perf_counter()
    llm.eval(prompt)
    pp = prompt_tokens / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for tok in rng.integers(10, 900, decode_tokens).tolist():
        llm.eval([tok])
    tg = decode_tokens / (time.perf_counter() - t0)
    llm.close()
    print(json.dumps({"load_s": round(load, 3), "prompt_tok_s": round(pp, 2), "decode_tok_s": round(tg, 3),
                      "buffers": sorted(set(buffers))}))


def compare(files: dict[str, Path], reference: str, extra_buffers: list[bool], repeats: int, threads: int,
            prompt_tokens: int, decode_tokens: int) -> dict[str, Any]:
    """Interleaved runs (every file once per round, so drift on a shared machine hits all alike); medians,
    and each file's ratio to the reference per measure (median of the per-round ratios)."""
    rows: dict[tuple[str, bool], list[dict[str, Any]]] = {(n, e): [] for n in files for e in extra_buffers}
    for rep in range(repeats + 1):  # round 0 warms the page cache and is not counted
        for extra in extra_buffers:
            for name, path in files.items():
                r = timed_run(path, extra, threads, prompt_tokens, decode_tokens)
                print(json.dumps({"round": rep, "file": name, "extra_buffers": extra, **r}), flush=True)
                if rep:
                    rows[(name, extra)].append(r)
    summary: dict[str, Any] = {}
    for (name, extra), runs in rows.items():
        key = f"{name}, extra buffers {'on' if extra else 'off'}"
        s = {m: round(statistics.median(r[m] for r in runs), 3) for m in ("load_s", "prompt_tok_s", "decode_tok_s")}
        s["buffers"] = runs[0]["buffers"]
        if name != reference:
            ref = rows[(reference, extra)]
            for m in ("prompt_tok_s", "decode_tok_s"):
                ratios = [a[m] / b[m] for a, b in zip(runs, ref, strict=False)]  # pairs of one repeat each
                s[f"{m}_ratio_to_{reference}"] = round(statistics.median(ratios), 3)
        summary[key] = s
    return summary
