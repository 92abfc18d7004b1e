"""A batch's results file: one record per (unit, question), appended and flushed as each answer finishes,
read back on resume (a line torn by a kill is cut away first), locked while a run writes it."""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from medgemma_cli.atomic import replace_text
from medgemma_cli.batch.units import Unit, short_hash
from medgemma_cli.errors import InputError
from medgemma_cli.inputs.collect import Collected
from medgemma_cli.printable import printable

CSV_FIELDS = ["unit", "unit_kind", "files", "modality", "images_sent", "question", "answer", "error", "model",
              "run_key", "first_token_s", "total_s", "prompt_tokens", "completion_tokens", "classify",
              "identifiers_removed", "warnings", "phi", "retryable"]
OLD_CSV_FIELDS = CSV_FIELDS[:-1]  # before "retryable": read, and rewritten with the column


def run_key(model_sha: str, question: str) -> str:
    """What a record's answer depends on: a different model or question never reuses old answers."""
    return short_hash(model_sha + "\n" + question)


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
        self.dropped_errors = 0  # final error records removed by retry_failed
        self.retrying = 0  # retryable error records of earlier runs, removed to be tried again
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
        rows: list[tuple[str, str, bool, bool]] = []  # unit, run key, error, retryable error
        kept: list[str] = []
        old_header = False
        if self.fmt == "jsonl":
            for line in text.splitlines(keepends=True):
                try:
                    r = json.loads(line)
                    err = bool(r.get("error"))
                    rows.append((r["unit"], r["run_key"], err, err and r.get("retryable") is True))
                    kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                    continue
            header = ""
        else:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            if reader.fieldnames and reader.fieldnames not in (CSV_FIELDS, OLD_CSV_FIELDS):
                raise InputError(self.path, "a CSV with other columns (another tool or version); choose a new --out")
            old_header = reader.fieldnames == OLD_CSV_FIELDS
            for r in reader:
                if r.get("unit") and r.get("run_key"):
                    err = bool(r.get("error"))
                    rows.append((r["unit"], r["run_key"], err, err and r.get("retryable") == "True"))
                    kept.append(self._csv_line([r.get(k, "") for k in CSV_FIELDS]))
            header = self._csv_line(CSV_FIELDS)
        # a retryable error (server down, 5xx, timeout) is never final: its record goes and the request is made
        # again; --retry-failed removes the final ones too. Each (unit, question) keeps exactly one record.
        drop = [retry or (err and retry_failed) for _, _, err, retry in rows]
        if any(drop) or old_header:
            self._rewrite(header + "".join(line for line, d in zip(kept, drop, strict=True) if not d))
            self.retrying = sum(r[3] for r in rows)
            self.dropped_errors = sum(d for d in drop) - self.retrying
            rows = [r for r, d in zip(rows, drop, strict=True) if not d]
        self.done = {(unit, key) for unit, key, _, _ in rows}
        self.errors = sum(err for _, _, err, _ in rows)

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


def parsed_answer(answer: str) -> dict[str, Any]:
    """`parsed`: the answer as JSON; a cut answer (max tokens) gets `parse_error` instead, never a guess."""
    try:
        return {"parsed": json.loads(answer)}
    except json.JSONDecodeError as e:
        return {"parsed": None, "parse_error": f"not complete JSON ({e.msg} at character {e.pos})"}


class Recorder:
    """Builds and appends the records of one run; counts what was written and what failed."""

    def __init__(self, records: RecordFile, folder: Path, keys: dict[str, str], model: str, include_phi: bool,
                 parse_json: bool = False):
        self.records, self.folder, self.keys, self.model, self.include_phi = records, folder, keys, model, include_phi
        self.parse_json = parse_json  # --schema: records carry the answer parsed (JSONL; CSV keeps the text)
        self.written = self.failed = self.retryable = 0

    def pending(self, u: Unit) -> list[str]:
        return [q for q, k in self.keys.items() if (u.id, k) not in self.records.done]

    def base(self, u: Unit) -> dict[str, Any]:
        return {"unit": u.id, "unit_kind": u.kind, "files": [printable(f.relative_to(self.folder)) for f in u.files],
                "modality": u.modality, "model": self.model,
                **({"prior_unit": u.prior.id} if u.prior is not None else {}),
                **({"phi": u.phi} if self.include_phi and u.phi else {})}

    def answer(self, u: Unit, q: str, images_sent: int, answer: str, timings: dict[str, float],
               tokens: dict[str, Any], classification: dict[str, Any] | None, inputs: Collected | None) -> None:
        self.records.append({**self.base(u), "images_sent": images_sent, "question": q, "answer": answer,
                             "identifiers_removed": inputs.identifiers_removed if inputs else 0,
                             "warnings": list(inputs.warnings) if inputs else [],
                             "error": None, "run_key": self.keys[q], "timings": timings, "tokens": tokens,
                             **({"classify": classification} if classification else {}),
                             **(parsed_answer(answer) if self.parse_json else {})})
        self.written += 1

    def error(self, u: Unit, q: str, error: str, retryable: bool = False) -> None:
        """`retryable`: the request was fine and the server failed (unreachable, 5xx, no answer in time); the
        next run replaces this record by trying again, without --retry-failed."""
        self.records.append({**self.base(u), "images_sent": 0, "question": q, "answer": None, "error": error,
                             **({"retryable": True} if retryable else {}),
                             "run_key": self.keys[q], "timings": None})
        self.written += 1
        self.retryable += retryable

    def fail_unit(self, u: Unit, error: str) -> None:
        self.failed += 1
        for q in self.pending(u):
            self.error(u, q, error)
