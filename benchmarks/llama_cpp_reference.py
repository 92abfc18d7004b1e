"""The independently produced file our speed benchmarks compare with, and the timed llama.cpp runs.

The reference holds llama.cpp's own tensors (`llama_model_quantize` run over our lossless GGUF) laid out by
gguf-py, llama.cpp's own Python writer, at `general.alignment = 64`: nothing of our layout code is in it, so
a regression in what we write (types, bytes, placement, metadata) shows as a ratio below 1. Its layout is
llama.cpp's best case: the same tensors at 32-byte alignment run at this speed only when the header happens
to end on a cache line (issue 17).
"""

from __future__ import annotations

import json
import os
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


def _others_busy() -> tuple[float, float] | None:
    """(CPU seconds all processes have used, CPU seconds this one has), from /proc/stat: None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system


def paired_runs(files: dict[str, Path], extra_buffers: bool, rounds: int, threads: int, prompt_tokens: int,
                decode_tokens: int) -> list[dict[str, Any]]:
    """All files loaded in one fresh process and timed in turns: each round reads the prompt with each model,
    then decodes one token with each model in turn, so load from other work hits every file alike.

    On a shared machine that is not enough (ggml's threads wait for each other, so one descheduled thread
    stalls them all): a round in which other processes used more than 5 % of the CPUs is marked contended,
    and rounds go on (up to four times as many) until `rounds` quiet ones are in. Round 0 warms the page
    cache and is not returned; the order of the files alternates by round."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import llama_cpp_reference as r; "
            f"r._child({ {k: str(v) for k, v in files.items()}!r}, {extra_buffers}, {rounds}, {threads}, "
            f"{prompt_tokens}, {decode_tokens})")
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"timed runs failed: {res.stderr[-2000:]}")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def _child(files: dict[str, str], extra_buffers: bool, rounds: int, threads: int, prompt_tokens: int,
           decode_tokens: int) -> None:
    from llama_cpp import _logger

    from medgemma_cli.llama.loader import buffer_types_used, load_llama

    _logger.set_verbose(False)
    models, loads, buffers = {}, {}, {}
    for name, path in files.items():
        t0 = time.perf_counter()
        with buffer_types_used() as seen:
            models[name] = load_llama(path, use_extra_buffers=extra_buffers, n_ctx=prompt_tokens + decode_tokens + 16,
                                      n_batch=prompt_tokens, n_threads=threads, n_threads_batch=threads,
                                      verbose=False)
        loads[name], buffers[name] = time.perf_counter() - t0, sorted(set(seen))
    rng = np.random.default_rng(1)
    prompt = [2, *rng.integers(10, 900, prompt_tokens - 1).tolist()]
    tokens = rng.integers(10, 900, decode_tokens).tolist()
    names, cpus = list(models), os.cpu_count() or 1
    quiet = 0
    for rnd in range(4 * rounds + 1):
        order = names if rnd % 2 == 0 else names[::-1]
        pp, tg = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        before, w0 = _others_busy(), time.perf_counter()
        for name in order:
            models[name].reset()
            t0 = time.perf_counter()
            models[name].eval(prompt)
            pp[name] = time.perf_counter() - t0
        for tok in tokens:
            for name in order:
                t0 = time.perf_counter()
                models[name].eval([tok])
                tg[name] += time.perf_counter() - t0
        after, wall = _others_busy(), time.perf_counter() - w0
        others = None
        if before and after:
            others = round(max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / (wall * cpus), 3)
        if rnd == 0:
            continue
        calm = others is None or others <= 0.05
        quiet += calm
        for name in names:
            print(json.dumps({"round": rnd, "file": name, "extra_buffers": extra_buffers, "others_cpu": others,
                              "quiet": calm, "load_s": round(loads[name], 3),
                              "prompt_tok_s": round(prompt_tokens / pp[name], 2),
                              "decode_tok_s": round(decode_tokens / tg[name], 3), "buffers": buffers[name]}),
                  flush=True)
        if quiet >= rounds:
            break
    for m in models.values():
        m.close()


def compare(files: dict[str, Path], reference: str, extra_buffers: list[bool], repeats: int, threads: int,
            prompt_tokens: int, decode_tokens: int) -> dict[str, Any]:
    """`repeats` quiet paired rounds per setting of the extra buffer types (all rounds where none was quiet,
    said so); medians, and each file's ratio to the reference per measure (median of per-round ratios)."""
    summary: dict[str, Any] = {}
    for extra in extra_buffers:
        runs = paired_runs(files, extra, repeats, threads, prompt_tokens, decode_tokens)
        for r in runs:
            print(json.dumps(r), flush=True)
        used = [r for r in runs if r["quiet"]] or runs
        by_file = {name: [r for r in used if r["file"] == name] for name in files}
        for name, mine in by_file.items():
            s = {m: round(statistics.median(r[m] for r in mine), 3) for m in ("prompt_tok_s", "decode_tok_s")}
            s.update(load_s=mine[0]["load_s"], buffers=mine[0]["buffers"], rounds=len(mine),
                     contended_rounds_left_out=sum(not r["quiet"] for r in runs if r["file"] == name),
                     only_contended_rounds=not any(r["quiet"] for r in runs))
            if name != reference:
                for m in ("prompt_tok_s", "decode_tok_s"):
                    ratios = [a[m] / b[m] for a, b in zip(mine, by_file[reference], strict=True)]
                    s[f"{m}_ratio_to_{reference}"] = round(statistics.median(ratios), 3)
                    s[f"{m}_ratio_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
            summary[f"{name}, extra buffers {'on' if extra else 'off'}"] = s
    return summary
