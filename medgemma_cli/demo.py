"""`medgemma demo`: the whole pipeline on a fresh machine, nothing downloaded.

The model is a tiny MedGemma-shaped checkpoint with random weights, so its answer is meaningless; the
point is to show that conversion and inference work end to end on this machine.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from medgemma_cli import store
from medgemma_cli.conversion import ConvertResult, convert
from medgemma_cli.progress import Progress
from medgemma_cli.synthetic import make_checkpoint

DEMO_QUESTION = "Describe the findings on this chest radiograph."
RANDOM_WEIGHTS_NOTICE = ("This demo model has random weights: its answer is meaningless. "
                         "Convert a real MedGemma checkpoint to get real answers (see the README).")


@dataclass
class DemoResult:
    checkpoint: Path
    model: ConvertResult
    question: str
    answer: str
    seconds: float


def demo_checkpoint() -> Path:
    """The tiny random checkpoint, generated once and cached (written aside, then renamed into place)."""
    target = store.cache_dir() / "demo-tiny-checkpoint"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        make_checkpoint(tmp, "tiny")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_model(progress: Progress | None = None) -> ConvertResult:
    ckpt = demo_checkpoint()
    out = store.models_dir() / "demo-tiny"
    manifest = out / "manifest.json"
    if manifest.is_file():
        import json

        return ConvertResult(out, json.loads(manifest.read_text(encoding="utf-8")))
    return convert(ckpt, out, preset="Q4_K_M", progress=progress)


def stream_answer(model_dir: Path, question: str, max_tokens: int = 32, threads: int | None = None) -> Iterator[str]:
    """Greedy text-only answer through llama.cpp with the model's own chat template."""
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(False)
    llm = llama_cpp.Llama(str(model_dir / "text.gguf"), n_ctx=512, n_threads=threads, verbose=False, seed=0)
    messages = [{"role": "user", "content": question}]
    for chunk in llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0, stream=True):
        delta = chunk["choices"][0].get("delta", {}).get("content")
        if delta:
            yield delta


def run_demo(progress: Progress | None = None, on_text: Callable[[str], None] | None = None) -> DemoResult:
    t0 = time.perf_counter()
    model = demo_model(progress)
    parts = []
    for piece in stream_answer(model.path, DEMO_QUESTION):
        parts.append(piece)
        if on_text:
            on_text(piece)
    return DemoResult(demo_checkpoint(), model, DEMO_QUESTION, "".join(parts), time.perf_counter() - t0)
