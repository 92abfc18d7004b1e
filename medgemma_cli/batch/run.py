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
import hmac
import io
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgemma_cli.atomic import replace_text
from medgemma_cli.errors import InputError, MedgemmaError
from medgemma_cli.inputs import dicom
from medgemma_cli.inputs.collect import Collected, collect, kind_of
from medgemma_cli.printable import printable
from medgemma_cli.report import save_thumbnail

UNIT_KINDS = ("series", "study", "file")
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "AccessionNumber", "InstitutionName")
CSV_FIELDS = ["unit", "unit_kind", "files", "modality", "images_sent", "question", "answer", "error", "model",
              "run_key", "first_token_s", "total_s", "prompt_tokens", "completion_tokens", "classify",
              "identifiers_removed", "warnings", "phi"]


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


def own_outputs(results: Path) -> set[Path]:
    """What a run writes beside its results: never read back as inputs (thumbnails are JPEGs)."""
    results = Path(results).resolve()
    from medgemma_cli.report import thumbnails_dir

    return {results, lock_path(results), unit_key_path(results), thumbnails_dir(results)}


def walk(folder: Path, ours: set[Path] | None = None) -> Walk:
    """Every regular file under `folder`, following links once: loops and unreadable entries are reported.
    `ours` (files and folders this tool writes) are left out without a word."""
    folder = Path(folder)
    ours = {Path(p).resolve() for p in ours or ()}
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()

    def rel(p: Path) -> str:  # for people to read: undecodable bytes and control characters escaped
        return printable(p.relative_to(folder) if p.is_relative_to(folder) else p)

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
            if ours and (p.resolve() in ours or (p.name.startswith(".") and ".partial" in p.name)):
                continue
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
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]  # names need not be UTF-8


def make_units(folder: Path, files: list[Path], unit: str = "series") -> list[Unit]:
    """Files grouped into units. A file unit is one file (two copies of one SOP instance are two units: a bad
    copy must not fail its good twin). A header that cannot be read makes that file a unit of its own, in
    error, and grouping goes on."""
    if unit not in UNIT_KINDS:
        raise MedgemmaError(f"unknown unit {unit!r}; choose one of {', '.join(UNIT_KINDS)}")
    units: dict[str, Unit] = {}
    for f in files:
        rel = str(f.relative_to(folder))
        is_dicom = kind_of(f) == "dicom"
        if not is_dicom and unit != "file":
            units.setdefault(_hash(rel), Unit(_hash(rel), "file", [f]))
            continue
        try:
            ds = dicom.read(f, pixels=False) if is_dicom else None
        except InputError as e:
            units[_hash(rel)] = Unit(_hash(rel), unit, [f], error=e.problem)
            continue
        modality = str(ds.get("Modality", "") or "") if ds is not None else ""
        if unit == "file":
            units[_hash(rel)] = Unit(_hash(rel), "file", [f], modality)
            continue
        assert ds is not None  # a file that is not DICOM is a unit of its own (above)
        key = "StudyInstanceUID" if unit == "study" else "SeriesInstanceUID"
        uid = str(ds.get(key, "") or "") or _hash(rel)
        u = units.setdefault(uid, Unit(uid, unit, [], modality,
                                       {t: str(ds.get(t)) for t in PHI_TAGS if ds.get(t) not in (None, "")}))
        u.files.append(f)
    return list(units.values())


def unit_id_key(out: Path, has_records: bool = False) -> bytes:
    """The secret behind one results file's unit ids, kept beside it (`<out>.unit-key`, owner-only): stable, so a
    resumed run finds its records; the site can map its own UIDs to ids with it; nobody else can."""
    path = unit_key_path(out)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if has_records:  # ids made without this key: every unit would be redone and recorded twice
            raise InputError(path, f"missing, but {Path(out).name} already holds records (from an older "
                                   "medgemma-cli, or --include-phi?); restore the key or choose another --out"
                             ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read the unit-id key ({e}); restore it or choose another --out") from None
    else:
        try:
            if len(text) == 64:
                return bytes.fromhex(text)
        except ValueError:
            pass
        raise InputError(path, "not a unit-id key (64 hex digits); restore it or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(32)
    replace_text(path, key.hex() + "\n", mode=0o600)
    return key


def pseudonym(key: bytes, unit_id: str) -> str:
    """HMAC-SHA256 of a unit id (a DICOM UID, or a hash of a relative path), shortened: no UID, date or device
    serial inside it leaves the site."""
    return "u" + hmac.new(key, unit_id.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:24]


def run_key(model_sha: str, question: str) -> str:
    """What a record's answer depends on: a different model or question never reuses old answers."""
    return _hash(model_sha + "\n" + question)


class RecordFile:
    """Append-only records, one line each; a torn last line is cut on open.

    Every line is flushed to the OS at once, so a killed process (SIGKILL included) loses nothing written.
    fsync, which only matters if the machine itself goes down, runs at most once a second and on close:
    per line it cost 0.4 ms, a tenth of a tiny model's time per unit."""

    SYNC_EVERY_S = 1.0

    def __init__(self, path: Path, fmt: str, retry_failed: bool = False):
        self.path, self.fmt = Path(path), fmt
        self.done: set[tuple[str, str]] = set()
        self.errors = 0  # error records in the file (earlier runs' included)
        self.dropped_errors = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_results(self.path)
        try:
            if self.path.exists():
                self._repair_and_load(retry_failed)
            new = not self.path.exists() or self.path.stat().st_size == 0
            self.f = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115 - held open until close()
        except BaseException:
            os.close(self._lock)
            raise
        self._synced = time.monotonic()
        if new and fmt == "csv":
            self._write_line(self._csv_line(CSV_FIELDS))

    def _complete(self, data: bytes) -> int:
        """Length of the whole records at the start of `data`: a JSON line never holds a raw newline, a CSV
        answer may, so there the cut must also fall outside quotes (an even number of them before it)."""
        end = data.rfind(b"\n") + 1
        if self.fmt == "csv":
            while end and data.count(b'"', 0, end) % 2:
                end = data.rfind(b"\n", 0, end - 1) + 1
        return end

    def _repair_and_load(self, retry_failed: bool) -> None:
        data = self.path.read_bytes()
        if (keep := self._complete(data)) < len(data):  # killed mid-record: drop the torn part
            with open(self.path, "r+b") as f:
                f.truncate(keep)
            data = data[:keep]
        text = data.decode("utf-8", "replace")
        if self.fmt == "jsonl":
            rows, kept = [], []
            for line in text.splitlines(keepends=True):
                try:
                    r = json.loads(line)
                    rows.append((r["unit"], r["run_key"], bool(r.get("error"))))
                    kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
            header = ""
        else:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            if reader.fieldnames and reader.fieldnames != CSV_FIELDS:
                raise InputError(self.path, "a CSV with other columns (another tool or version); choose a new --out")
            rows, kept = [], []
            for r in reader:
                if r.get("unit") and r.get("run_key"):
                    rows.append((r["unit"], r["run_key"], bool(r.get("error"))))
                    kept.append(self._csv_line([r.get(k, "") for k in CSV_FIELDS]))
            header = self._csv_line(CSV_FIELDS)
        if retry_failed and any(err for _, _, err in rows):
            self._rewrite(header + "".join(line for line, (_, _, err) in zip(kept, rows, strict=True) if not err))
            self.dropped_errors = sum(err for _, _, err in rows)
            rows = [r for r in rows if not r[2]]
        self.done = {(unit, key) for unit, key, _ in rows}
        self.errors = sum(err for _, _, err in rows)

    def _rewrite(self, text: str) -> None:
        """Replace the file in one step (written aside, synced, renamed): a kill leaves the old or the new."""
        replace_text(self.path, text, sync=True)

    @staticmethod
    def _csv_line(values: list[Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        return buf.getvalue()

    def _write_line(self, line: str) -> None:
        self.f.write(line)
        self.f.flush()
        if time.monotonic() - self._synced >= self.SYNC_EVERY_S:
            os.fsync(self.f.fileno())
            self._synced = time.monotonic()

    def append(self, record: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            self._write_line(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            timings, tokens = record.get("timings") or {}, record.get("tokens") or {}
            row = {**record, "files": ";".join(record["files"]), "phi": json.dumps(record.get("phi") or {}),
                   "warnings": "; ".join(record.get("warnings") or []),
                   "classify": json.dumps(record["classify"]) if record.get("classify") else "",
                   "first_token_s": timings.get("first_token_s", ""), "total_s": timings.get("total_s", ""),
                   "prompt_tokens": tokens.get("prompt", ""), "completion_tokens": tokens.get("completion", "")}
            self._write_line(self._csv_line([row.get(k, "") for k in CSV_FIELDS]))
        self.done.add((record["unit"], record["run_key"]))
        self.errors += bool(record.get("error"))

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.close(self._lock)  # releases the lock


def lock_path(results: Path) -> Path:
    return Path(results).with_name(Path(results).name + ".lock")


def unit_key_path(results: Path) -> Path:
    return Path(results).with_name(Path(results).name + ".unit-key")


def _lock_results(results: Path) -> int:
    """An advisory lock beside the results, held while they are written: two runs on one --out would write
    every record twice. The kernel drops it when the process ends, however it ends."""
    import fcntl

    path = lock_path(results)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "another process"
        os.close(fd)
        raise InputError(results, f"another medgemma batch (PID {holder}) is writing these results; wait for it "
                                  "to finish, or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass
class ClassifyOptions:
    """`--classify`: MedSigLIP probabilities for the images each unit sent, added to its records."""
    labels: list[str]
    model: Path | None = None
    template: str | None = None
    softmax: bool = False
    threads: int | None = None


@dataclass
class ServerOptions:
    """`--server`: answers come from an OpenAI-compatible server; images are rendered and resized here."""
    url: str
    model: str | None = None
    workers: int = 1
    image_size: int = 896  # MedGemma's SigLIP input; the server would resize anything else again
    image_tokens: int = 256  # Gemma 3's tokens per image, for fitting slices into --ctx
    timeout: float = 600.0


@dataclass
class BatchSummary:
    units: int
    records_written: int
    done_before: int
    failed: int
    skipped: list[tuple[str, str]]
    seconds: float
    model_seconds: float  # local: time inside the model (encode, prefill, decode); server: summed request time
    model: str = ""
    retried: int = 0  # error records removed by retry_failed
    worker_seconds: float = 0.0  # local: what the model's own process added (its start, pickling, pipes)
    worker_idle_seconds: float = 0.0  # local: the model waiting for units to be read and rendered
    errors_in_file: int = 0  # error records the results file holds now (earlier runs' included)


@dataclass
class _Prepared:
    unit: Unit
    inputs: Collected | None
    error: str | None
    image_uris: list[str] = field(default_factory=list)


def _prefetch(units: list[Unit], prepare: Callable[[Unit], _Prepared], depth: int = 1) -> Iterator[_Prepared]:
    """Read and render the next units in a helper thread while the model answers the current one."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def run() -> None:
        for u in units:
            if stop.is_set():
                return
            q.put(prepare(u))
        q.put(None)

    threading.Thread(target=run, name="medgemma-batch-prefetch", daemon=True).start()
    try:
        while (item := q.get()) is not None:
            yield item
    finally:
        stop.set()


def _classification(zero_shot: Any, inputs: Collected) -> dict[str, Any]:
    """Over the slices the model saw, before resizing (MedSigLIP pads to a square rather than stretching):
    the mean and the max, so a series reads as 'how much, and where most'."""
    images = [img.full if img.full is not None else img.rgb for img in inputs.images]
    p = zero_shot.probabilities(images)
    for img in inputs.images:
        img.full = None  # only MedSigLIP needed it; the unit may wait a while for the server
    return {"images": len(images),
            "mean": {lb: round(float(v), 4) for lb, v in zip(zero_shot.labels, p.mean(axis=0), strict=True)},
            "max": {lb: round(float(v), 4) for lb, v in zip(zero_shot.labels, p.max(axis=0), strict=True)}}


class _Writer:
    """Builds and appends the records of one run; counts what was written and what failed."""

    def __init__(self, records: RecordFile, folder: Path, keys: dict[str, str], model: str, include_phi: bool):
        self.records, self.folder, self.keys, self.model, self.include_phi = records, folder, keys, model, include_phi
        self.written = self.failed = 0

    def pending(self, u: Unit) -> list[str]:
        return [q for q, k in self.keys.items() if (u.id, k) not in self.records.done]

    def base(self, u: Unit) -> dict[str, Any]:
        return {"unit": u.id, "unit_kind": u.kind, "files": [printable(f.relative_to(self.folder)) for f in u.files],
                "modality": u.modality, "model": self.model,
                **({"phi": u.phi} if self.include_phi and u.phi else {})}

    def answer(self, u: Unit, q: str, images_sent: int, answer: str, timings: dict[str, float],
               tokens: dict[str, Any], classification: dict[str, Any] | None, inputs: Collected | None) -> None:
        self.records.append({**self.base(u), "images_sent": images_sent, "question": q, "answer": answer,
                             "identifiers_removed": inputs.identifiers_removed if inputs else 0,
                             "warnings": list(inputs.warnings) if inputs else [],
                             "error": None, "run_key": self.keys[q], "timings": timings, "tokens": tokens,
                             **({"classify": classification} if classification else {})})
        self.written += 1

    def error(self, u: Unit, q: str, error: str) -> None:
        self.records.append({**self.base(u), "images_sent": 0, "question": q, "answer": None, "error": error,
                             "run_key": self.keys[q], "timings": None})
        self.written += 1

    def fail_unit(self, u: Unit, error: str) -> None:
        self.failed += 1
        for q in self.pending(u):
            self.error(u, q, error)


def run_batch(folder: Path, questions: list[str], out: Path, *, fmt: str = "jsonl", unit: str = "series",
              model: Path | None = None, gguf: Path | None = None, mmproj: Path | None = None,
              options: Any = None, include_phi: bool = False, classify: ClassifyOptions | None = None,
              server: ServerOptions | None = None, retry_failed: bool = False,
              on_progress: Callable[[int, int, str], None] | None = None) -> BatchSummary:
    """Answer every question about every unit under `folder`, appending records to `out` as they finish.

    `retry_failed` first removes earlier error records (a server that was down, a file since fixed), so those
    units are tried again and each (unit, question) still has exactly one record."""
    from medgemma_cli.answering import AskOptions

    t_start = time.perf_counter()
    questions = list(dict.fromkeys(q.strip() for q in questions if q.strip()))
    if not questions:
        raise MedgemmaError("give at least one question (--question or --questions FILE)")
    if fmt not in ("jsonl", "csv"):
        raise MedgemmaError("--format is jsonl or csv")
    opts = options or AskOptions()
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    n_ctx = min(opts.ctx or 8192, 131072)
    worker = None
    image_size: int | None

    if server is not None:
        from medgemma_cli.remote import ChatServer

        if server.workers < 1:
            raise MedgemmaError("--workers must be at least 1")
        client = ChatServer(server.url, server.model, timeout=server.timeout)
        model_name = client.resolve_model()
        image_size, image_tokens = server.image_size, server.image_tokens
    else:
        from medgemma_cli.batch_worker import EngineConfig, ModelWorker
        from medgemma_cli.runtime import resolve_model

        files = resolve_model(model, gguf, mmproj)
        model_name = files.name
        image_size = files.vision["image_size"] if files.vision else None
        image_tokens = files.vision["image_tokens"] if files.vision else 0
        # the model loads in its own process while this one walks the folder and hashes the model file
        worker = ModelWorker(EngineConfig(files, n_ctx, opts.threads, opts.gpu_layers, opts.vision_backend,
                                          opts.verbose))
    records = None
    try:
        if worker is not None:
            worker.start()
        w = walk(folder, ours=own_outputs(out))
        units = make_units(folder, w.files, unit)
        records = RecordFile(out, fmt, retry_failed)  # the lock first: the key and the records are this run's
        if not include_phi:  # DICOM UIDs identify the patient's study; records carry keyed hashes of them
            key = unit_id_key(out, has_records=bool(records.done))
            for u in units:
                u.id = pseudonym(key, u.id)
        if server is not None:
            identity = "server:" + model_name
        else:
            from medgemma_cli.checksums import sha256_file

            identity = sha256_file(files.text)[:16]
        zero_shot = None
        if classify is not None:
            from medgemma_cli.siglip import ZeroShot

            zero_shot = ZeroShot(classify.labels, model=classify.model, template=classify.template,
                                 softmax=classify.softmax, threads=classify.threads)
            identity += "\nclassify:" + zero_shot.identity()

        keys = {q: run_key(identity, q) for q in questions}
        writer = _Writer(records, folder, keys, model_name, include_phi)
        done_before = sum(1 for u in units for k in keys.values() if (u.id, k) in records.done)
        todo = [u for u in units if writer.pending(u)]
        per_image = image_tokens + 8  # the image, its markers and a slice label
        max_slices = max(1, min(opts.max_slices, (n_ctx - opts.max_tokens - 512) // per_image)) if image_size else 0

        def prepare(u: Unit) -> _Prepared:
            if u.error:
                return _Prepared(u, None, u.error)
            try:
                inputs = collect(u.files, image_size, max_slices, keep_full=zero_shot is not None,
                                 scrub_identifiers=not include_phi)
                images = [img.rgb for img in inputs.images]
                save_thumbnail(Path(out), u.id, images)
                uris = []
                if server is not None:
                    from medgemma_cli.remote import png_data_uri

                    uris = [png_data_uri(rgb) for rgb in images]
                return _Prepared(u, inputs, None, uris)
            except InputError as e:
                return _Prepared(u, None, printable(f"{Path(e.path).name if e.path else ''}: {e.problem}".strip(": ")))
            except Exception as e:  # noqa: BLE001 - a bad unit must not stop the batch
                return _Prepared(u, None, f"{type(e).__name__}: {e}")

        model_seconds = worker_seconds = worker_idle = 0.0
        if server is not None:
            model_seconds = _answer_by_server(client, server.workers, todo, prepare, opts, writer, zero_shot,
                                              on_progress)
        elif todo and worker is not None:
            local = _answer_locally(worker, todo, prepare, opts, writer, zero_shot, on_progress)
            model_seconds, worker_seconds, worker_idle = local.model, local.worker, local.worker_idle
    except BaseException:
        if worker is not None:
            worker.close(kill=True)  # interrupted or failed: no point in a tidy goodbye
            worker = None
        raise
    finally:
        if records is not None:
            records.close()
        if worker is not None:
            worker.close()
    return BatchSummary(len(units), writer.written, done_before, writer.failed, w.skipped,
                        time.perf_counter() - t_start, model_seconds, model_name, records.dropped_errors,
                        worker_seconds, worker_idle, records.errors)


CRASH_TRIES = 2  # a unit whose answering crashed the model this often is an error until --retry-failed
CRASHED_UNITS_IN_A_ROW = 3  # then the fault is not in the units: stop rather than reload the model for each


@dataclass
class _LocalTimes:
    model: float = 0.0  # inside the model, as the worker measured it
    worker: float = 0.0  # what the worker process added: its start (not the model load), pickling, pipes
    worker_idle: float = 0.0  # the model waiting for the next unit (rendering could not keep up)


@dataclass
class _InFlight:
    prepared: _Prepared
    classification: dict[str, Any] | None
    crash_for_test: bool
    attempts: int = 1


def _answer_locally(worker: Any, todo: list[Unit], prepare: Callable[[Unit], _Prepared], opts: Any,
                    writer: _Writer, zero_shot: Any, on_progress: Callable[[int, int, str], None] | None
                    ) -> _LocalTimes:
    """The model (loaded once, again after a crash) answers in a worker process; each unit is encoded once and
    answers all its questions. The next unit is queued in the worker before the current one is finished.

    If the worker dies, the unit it was answering keeps the answers already written and is tried once more by a
    fresh worker; a second crash makes its remaining questions error records. Units queued behind it are
    simply sent again."""
    from collections import deque

    from medgemma_cli.batch_worker import Answered, UnitError, WorkerCrashed, job_for
    from medgemma_cli.containment import test_crash_requested

    times = _LocalTimes()
    inflight: deque[_InFlight] = deque()
    units = iter(_prefetch(todo, prepare))
    started = 0
    crashed_in_a_row = 0

    def submit(f: _InFlight) -> None:
        inputs = f.prepared.inputs
        assert inputs is not None
        worker.submit(job_for(inputs, writer.pending(f.prepared.unit), opts, f.crash_for_test))

    def refill() -> None:
        nonlocal started
        while len(inflight) < 2:
            p = next(units, None)
            if p is None:
                return
            if on_progress:
                on_progress(started, len(todo), p.unit.id)
            started += 1
            if p.error is not None or p.inputs is None:
                writer.fail_unit(p.unit, p.error or "nothing could be read")
                continue
            n = len(p.inputs.images)
            f = _InFlight(p, _classification(zero_shot, p.inputs) if zero_shot and n else None,
                          test_crash_requested("unit", " ".join(x.name for x in p.unit.files)))
            inflight.append(f)
            submit(f)

    try:
        refill()
        while inflight:
            f = inflight[0]
            u, n_images = f.prepared.unit, len(f.prepared.inputs.images) if f.prepared.inputs else 0
            try:
                result = worker.receive()
            except WorkerCrashed as e:  # answers so far are written; the rest go to a fresh worker
                if f.attempts >= CRASH_TRIES:
                    writer.fail_unit(u, f"{e} (tried {CRASH_TRIES} times; --retry-failed tries again)")
                    inflight.popleft()
                    crashed_in_a_row += 1
                    if crashed_in_a_row >= CRASHED_UNITS_IN_A_ROW:
                        raise MedgemmaError(f"{e}, on {crashed_in_a_row} units in a row: stopped (re-running the same "
                                            "command goes on with the units not tried yet)") from None
                else:
                    f.attempts += 1
                for queued in inflight:
                    submit(queued)
                refill()
                continue
            if isinstance(result, Answered):
                times.model += result.model_s
                writer.answer(u, result.question, n_images, result.answer,
                              {"first_token_s": result.first_token_s, "total_s": result.total_s},
                              {"prompt": result.prompt_tokens, "completion": result.completion_tokens},
                              f.classification, f.prepared.inputs)
            elif isinstance(result, UnitError):
                writer.fail_unit(u, result.message)
            else:  # this unit is done
                crashed_in_a_row = 0
                times.worker += result.handling_s
                times.worker_idle += result.idle_s
                inflight.popleft()
                refill()
    finally:
        times.worker += worker.start_overhead_s + worker.submit_s
    return times


def _answer_by_server(client: Any, workers: int, todo: list[Unit], prepare: Callable[[Unit], _Prepared], opts: Any,
                      writer: _Writer, zero_shot: Any, on_progress: Callable[[int, int, str], None] | None) -> float:
    """Up to `workers` requests in flight; records are appended here, in the order answers arrive.

    The request threads are daemons (not a ThreadPoolExecutor, whose workers are joined at exit): Ctrl-C ends
    the run at once instead of waiting for answers that would no longer be written."""
    from medgemma_cli.remote import ServerError, chat_messages

    @dataclass
    class State:
        prepared: _Prepared
        remaining: int
        classification: dict[str, Any] | None = None
        failed: bool = False

    jobs: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()

    def work() -> None:
        while (job := jobs.get()) is not None:
            state, q, messages = job
            try:
                results.put((state, q, client.chat(messages, opts.max_tokens, opts.temperature, opts.seed)))
            except Exception as e:  # noqa: BLE001 - handed to the main thread, which decides
                results.put((state, q, e))

    for i in range(workers):
        threading.Thread(target=work, name=f"medgemma-batch-request-{i}", daemon=True).start()
    in_flight = finished_units = 0
    request_seconds = 0.0

    def settle(limit: int) -> None:
        nonlocal in_flight, finished_units, request_seconds
        while in_flight > limit:
            state, q, reply = results.get()
            in_flight -= 1
            u = state.prepared.unit
            if isinstance(reply, ServerError):
                state.failed = True
                writer.error(u, q, str(reply))
            elif isinstance(reply, BaseException):
                raise reply
            else:
                request_seconds += reply.seconds
                writer.answer(u, q, len(state.prepared.inputs.images), reply.answer,
                              {"total_s": round(reply.seconds, 3)},
                              {"prompt": reply.prompt_tokens, "completion": reply.completion_tokens},
                              state.classification, state.prepared.inputs)
            state.remaining -= 1
            if state.remaining == 0:
                finished_units += 1
                writer.failed += state.failed

    try:
        for p in _prefetch(todo, prepare, depth=workers):
            u = p.unit
            if on_progress:
                on_progress(finished_units, len(todo), u.id)
            if p.error is not None or p.inputs is None:
                writer.fail_unit(u, p.error or "nothing could be read")
                finished_units += 1
                continue
            qs = writer.pending(u)
            state = State(p, len(qs))
            for q in qs:
                jobs.put((state, q, chat_messages(q, p.inputs, p.image_uris, opts.system, opts.with_metadata)))
                in_flight += 1
            if zero_shot is not None and p.inputs.images:  # runs here while the server works
                state.classification = _classification(zero_shot, p.inputs)
            settle(limit=2 * workers)  # a bounded queue: the folder is not read into memory ahead of the server
        settle(limit=0)
    finally:
        for _ in range(workers):
            jobs.put(None)
    return request_seconds
