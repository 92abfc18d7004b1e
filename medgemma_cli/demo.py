"""`medgemma demo`: the whole pipeline on a fresh machine, nothing downloaded.

The model is a tiny MedGemma-shaped checkpoint with random weights, so its answer is meaningless; the
point is to show that conversion and inference work end to end on this machine.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medgemma_cli import store
from medgemma_cli.conversion import ConvertResult, convert
from medgemma_cli.errors import MedgemmaError
from medgemma_cli.progress import Progress
from medgemma_cli.synthetic import make_checkpoint

DEMO_QUESTION = "Describe the findings on this CT slice, taking the note into account."
RANDOM_WEIGHTS_NOTICE = ("This demo model has random weights: its answer is meaningless. "
                         "Convert a real MedGemma checkpoint to get real answers (see the README).")


@dataclass
class DemoResult:
    checkpoint: Path
    model: ConvertResult
    question: str
    answer: str
    seconds: float
    inputs: list[Path]
    saved_inputs: list[Path]
    completion_tokens: int


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


def sample_inputs(folder: Path) -> list[Path]:
    """A CT slice that ships with pydicom, and a short note."""
    from medgemma_cli.offline import import_pydicom

    import_pydicom()
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    note = folder / "note.txt"
    note.write_text("72-year-old with cough and fever for three days. History of smoking.\n", encoding="utf-8")
    ct = get_testdata_file("CT_small.dcm", download=False)
    if not isinstance(ct, str):  # None: the file that ships with pydicom is not there
        raise MedgemmaError("pydicom's own CT_small.dcm is missing; reinstall pydicom")
    return [Path(ct), note]


def run_demo(progress: Progress | None = None, on_text: Callable[[str], None] | None = None) -> DemoResult:
    from medgemma_cli.answering import AskOptions, ask

    t0 = time.perf_counter()
    model = demo_model(progress)
    work = store.cache_dir() / "demo-inputs"
    files = sample_inputs(work)
    result = ask(DEMO_QUESTION, files, model=model.path,
                 options=AskOptions(max_tokens=24, save_input=work / "model-input"), on_text=on_text)
    return DemoResult(demo_checkpoint(), model, DEMO_QUESTION, result.answer, time.perf_counter() - t0,
                      files, [Path(p) for p in result.saved_inputs], result.tokens["completion"])
