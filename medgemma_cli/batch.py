"""`medgemma batch`: a folder of scans → one record per (unit, question), appended as it goes, resumable.

Units are series (default), studies or single files. Each unit's images are rendered once and every question
is answered from that one encoding. Records go to JSONL or CSV, one line each, written and flushed as each
answer finishes; a re-run skips what is already there (a line torn by a kill is cut away first), and a bad
unit becomes an error record, never the end of the batch. Records carry no patient names, IDs or dates
unless asked; unit ids are DICOM UIDs, or hashes of relative paths for other files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from medgemma_cli.errors import InputError, MedgemmaError
from medgemma_cli.inputs import dicom
from medgemma_cli.inputs.collect import Collected, collect, kind_of
from medgemma_cli.report import save_thumbnail

UNIT_KINDS = ("series", "study", "file")
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "AccessionNumber", "InstitutionName")
CSV_FIELDS = ["unit", "unit_kind", "files", "modality", "images_sent", "question", "answer", "error", "model",
              "run_key", "first_token_s", "total_s", "phi"]


@dataclass
class Unit:
    id: str
    kind: str
    files: list[Path]
    modality: str = ""
    phi: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # a unit that cannot even be grouped (unreadable header)


@dataclass
class Walk:
    files: list[Path]
    skipped: list[tuple[str, str]]  # (relative path, why)


def walk(folder: Path) -> Walk:
    """Every regular file under `folder`, following links once: loops and unreadable entries are reported."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()

    def rel(p: Path) -> str:
        return str(p.relative_to(folder)) if p.is_relative_to(folder) else str(p)

    def visit(d: Path) -> None:
        try:
            st = d.stat()
        except OSError as e:
            skipped.append((rel(d), f"unreadable: {e.strerror or e}"))
            return
        key = (st.st_dev, st.st_ino)
        if key in seen:
            skipped.append((rel(d), "symbolic link loop (already visited)"))
            return
        seen.add(key)
        try:
            entries = sorted(d.iterdir())
        except OSError as e:
            skipped.append((rel(d), f"unreadable folder: {e.strerror or e}"))
            return
        for p in entries:
            try:
                if p.is_dir():
                    visit(p)
                elif p.is_file():
                    files.append(p)
                elif p.is_symlink():
                    skipped.append((rel(p), "broken or looping symbolic link"))
            except OSError as e:
                skipped.append((rel(p), f"unreadable: {e.strerror or e}"))

    visit(folder)
    kept = []
    for f in files:
        name = rel(f)
        if f.name == "DICOMDIR":
            skipped.append((name, "DICOMDIR index (the files it lists are read directly)"))
        elif f.stat().st_size == 0:
            skipped.append((name, "empty file"))
        elif kind_of(f) in ("dicom", "image"):
            kept.append(f)
        else:
            skipped.append((name, "not DICOM or a PNG/JPEG image"))
    return Walk(kept, skipped)


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_units(folder: Path, files: list[Path], unit: str = "series") -> list[Unit]:
    if unit not in UNIT_KINDS:
        raise MedgemmaError(f"unknown unit {unit!r}; choose one of {', '.join(UNIT_KINDS)}")
    units: dict[str, Unit] = {}
    for f in files:
        rel = str(f.relative_to(folder))
        if kind_of(f) != "dicom" or unit == "file":
            uid = _hash(rel) if kind_of(f) != "dicom" else None
            if uid is None:
                try:
                    ds = dicom.read(f, pixels=False)
                    uid = str(ds.get("SOPInstanceUID", "")) or _hash(rel)
                except InputError as e:
                    units[_hash(rel)] = Unit(_hash(rel), "file", [f], error=e.problem)
                    continue
            units.setdefault(uid, Unit(uid, "file", [], "" if kind_of(f) != "dicom" else str(ds.get("Modality", ""))))
            units[uid].files.append(f)
            continue
        try:
            ds = dicom.read(f, pixels=False)
        except InputError as e:
            units[_hash(rel)] = Unit(_hash(rel), unit, [f], error=e.problem)
            continue
        key = "StudyInstanceUID" if unit == "study" else "SeriesInstanceUID"
        uid = str(ds.get(key, "")) or _hash(rel)
        u = units.setdefault(uid, Unit(uid, unit, [], str(ds.get("Modality", "")),
                                       {t: str(ds.get(t)) for t in PHI_TAGS if ds.get(t) not in (None, "")}))
        u.files.append(f)
    return list(units.values())


def run_key(model_sha: str, question: str) -> str:
    """What a record's answer depends on: a different model or question never reuses old answers."""
    return _hash(model_sha + "\n" + question)


class RecordFile:
    """Append-only records, one line each, flushed and synced; a torn last line is cut on open."""

    def __init__(self, path: Path, fmt: str):
        self.path, self.fmt = Path(path), fmt
        self.done: set[tuple[str, str]] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._repair_and_load()
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.f = open(self.path, "a", encoding="utf-8", newline="")
        if new and fmt == "csv":
            self._write_line(self._csv_line(CSV_FIELDS))

    def _repair_and_load(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # killed mid-line: drop the torn part
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
            data = data[:keep]
        text = data.decode("utf-8", "replace")
        if self.fmt == "jsonl":
            for line in text.splitlines():
                try:
                    r = json.loads(line)
                    self.done.add((r["unit"], r["run_key"]))
                except (json.JSONDecodeError, KeyError):
                    continue
        else:
            for r in csv.DictReader(io.StringIO(text)):
                if r.get("unit") and r.get("run_key"):
                    self.done.add((r["unit"], r["run_key"]))

    @staticmethod
    def _csv_line(values: list[Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        return buf.getvalue()

    def _write_line(self, line: str) -> None:
        self.f.write(line)
        self.f.flush()
        os.fsync(self.f.fileno())

    def append(self, record: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            self._write_line(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            row = {**record, "files": ";".join(record["files"]), "phi": json.dumps(record.get("phi") or {}),
                   "first_token_s": (record.get("timings") or {}).get("first_token_s", ""),
                   "total_s": (record.get("timings") or {}).get("total_s", "")}
            self._write_line(self._csv_line([row.get(k, "") for k in CSV_FIELDS]))
        self.done.add((record["unit"], record["run_key"]))

    def close(self) -> None:
        self.f.close()


@dataclass
class BatchSummary:
    units: int
    records_written: int
    done_before: int
    failed: int
    skipped: list[tuple[str, str]]
    seconds: float
    model_seconds: float


def _prefetch(units: list[Unit], render: Callable[[Unit], tuple[Collected | None, str | None]]) -> Iterator:
    """Render the next unit's images in a helper thread while the model answers the current one."""
    q: queue.Queue = queue.Queue(maxsize=1)

    def run() -> None:
        for u in units:
            q.put((u, *render(u)))
        q.put(None)

    threading.Thread(target=run, name="medgemma-batch-prefetch", daemon=True).start()
    while (item := q.get()) is not None:
        yield item


def run_batch(folder: Path, questions: list[str], out: Path, *, fmt: str = "jsonl", unit: str = "series",
              model: Path | None = None, gguf: Path | None = None, mmproj: Path | None = None,
              options: Any = None, include_phi: bool = False,
              on_progress: Callable[[int, int, str], None] | None = None) -> BatchSummary:
    from medgemma_cli.answering import AskOptions
    from medgemma_cli.checksums import sha256_file
    from medgemma_cli.runtime import Engine, resolve_model
    from medgemma_cli.session import PrefixSession

    t_start = time.perf_counter()
    questions = [q.strip() for q in questions if q.strip()]
    if not questions:
        raise MedgemmaError("give at least one question (--question or --questions FILE)")
    if fmt not in ("jsonl", "csv"):
        raise MedgemmaError("--format is jsonl or csv")
    opts = options or AskOptions()
    folder = Path(folder)
    w = walk(folder)
    units = make_units(folder, w.files, unit)
    files = resolve_model(model, gguf, mmproj)
    model_sha = sha256_file(files.text)[:16]
    keys = {q: run_key(model_sha, q) for q in questions}
    records = RecordFile(out, fmt)
    done_before = sum(1 for u in units for q in questions if (u.id, keys[q]) in records.done)
    todo = [u for u in units if any((u.id, keys[q]) not in records.done for q in questions)]
    vision = files.vision
    n_ctx = min(opts.ctx or 8192, 131072)
    per_image = (vision["image_tokens"] + 8) if vision else 0
    max_slices = max(1, min(opts.max_slices, (n_ctx - opts.max_tokens - 512) // per_image)) if vision else 0

    def render(u: Unit) -> tuple[Collected | None, str | None]:
        if u.error:
            return None, u.error
        try:
            return collect(u.files, vision["image_size"] if vision else None, max_slices), None
        except InputError as e:
            return None, f"{Path(e.path).name if e.path else ''}: {e.problem}".strip(": ")
        except Exception as e:  # noqa: BLE001 - a bad unit must not stop the batch
            return None, f"{type(e).__name__}: {e}"

    written = failed = 0
    model_seconds = 0.0
    engine = None
    try:
        engine = Engine(files, n_ctx=n_ctx, threads=opts.threads, gpu_layers=opts.gpu_layers,
                        vision_backend=opts.vision_backend)
        for i, (u, inputs, error) in enumerate(_prefetch(todo, render)):
            if on_progress:
                on_progress(i, len(todo), u.id)
            rel = [str(f.relative_to(folder)) for f in u.files]
            base = {"unit": u.id, "unit_kind": u.kind, "files": rel, "modality": u.modality,
                    "model": files.name, **({"phi": u.phi} if include_phi and u.phi else {})}
            if error is None:
                try:
                    t0 = time.perf_counter()
                    session = PrefixSession(engine, inputs, opts.system, opts.with_metadata)
                    session.start()
                    save_thumbnail(Path(out), u.id, [img.rgb for img in inputs.images])
                    for q in questions:
                        if (u.id, keys[q]) in records.done:
                            continue
                        turn = session.ask(q, opts.max_tokens, opts.temperature, opts.seed)
                        records.append({**base, "images_sent": len(inputs.images), "question": q,
                                        "answer": turn.answer, "error": None, "run_key": keys[q],
                                        "timings": {"first_token_s": round(turn.timings.first_token_s, 3),
                                                    "total_s": round(turn.timings.decode_s + turn.timings.prefill_s, 3)}})
                        written += 1
                    model_seconds += time.perf_counter() - t0
                    continue
                except MedgemmaError as e:
                    error = str(e)
            failed += 1
            for q in questions:
                if (u.id, keys[q]) not in records.done:
                    records.append({**base, "images_sent": 0, "question": q, "answer": None, "error": error,
                                    "run_key": keys[q], "timings": None})
                    written += 1
    finally:
        records.close()
        if engine is not None:
            engine.close()
    return BatchSummary(len(units), written, done_before, failed, w.skipped, time.perf_counter() - t_start,
                        model_seconds)
