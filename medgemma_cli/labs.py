"""`medgemma extract labs`: lab tests read off report pages by MedGemma 1.5's document recipe, as rows.

The recipe (technical report, table 11) sends a lab report as page images and asks for a JSON list of tests with
eight fields. It does not say how a document of several pages is sent. Here each page is its own call: the page
image, then the recipe's text, in one user turn (the order the research notes recommend), from a fresh context.
A page then costs the same whatever the document's length, no page's tests can be attributed to another, and a
page that fails is that page alone. The model is loaded once for all files. A grammar built from `lab_schema`
holds each answer to the recipe's shape; the rows are merged in page order, each tagged with its file and page.

Field values are strings (a result may be "Positive" or "<0.5"). `name` and `result` are never null (a row
without them is not a test); the other six are null where the page does not say, so "not on the page" is never
confused with an empty value. The collection time's format (DD-MM-YYYY HH:MM:SS) is asked for in the prompt but
not forced: a page that gives only a date would otherwise make the model invent a time.
"""

from __future__ import annotations

import csv
import io
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medgemma_cli.defaults import MAX_PAGES
from medgemma_cli.errors import InputError, MedgemmaError

FIELDS = ("name", "result", "unit", "range", "panel", "method", "specimen", "sample_collection_time")
NEVER_NULL = ("name", "result")
# The longest value the grammar lets each field have: a runaway string is ended, never an endless answer
FIELD_CHARS = {"name": 120, "result": 60, "unit": 30, "range": 60, "panel": 120, "method": 80, "specimen": 60,
               "sample_collection_time": 40}
MAX_ROWS = 100  # tests per page; a dense page holds 40-60
CSV_COLUMNS = ("file", "page", *FIELDS)
OUTPUT_SUFFIXES = (".json", ".csv")
CUT_SHORT = ("max_tokens", "context_full")  # the engine's stops that a larger --max-tokens would avoid
DOCUMENTS = "PDF files, scanned pages (PNG/JPEG) and DICOM Encapsulated PDF"


def lab_schema(max_rows: int = MAX_ROWS, max_chars: int | None = None) -> dict[str, Any]:
    """The recipe's answer: a list of objects with exactly its eight string fields (see the module's docstring
    for which may be null). `max_chars` caps every field at that length instead of FIELD_CHARS (tests)."""
    props: dict[str, Any] = {}
    for name in FIELDS:
        cap = max_chars if max_chars is not None else FIELD_CHARS[name]
        # anyOf rather than "type": [string, null]: the grammar converter drops maxLength from a type list
        props[name] = ({"type": "string", "minLength": 1, "maxLength": cap} if name in NEVER_NULL
                       else {"anyOf": [{"type": "string", "maxLength": cap}, {"type": "null"}]})
    return {"type": "array", "maxItems": max_rows,
            "items": {"type": "object", "properties": props, "required": list(FIELDS),
                      "additionalProperties": False}}


def check_rows(data: Any, schema: dict[str, Any]) -> str | None:
    """Why `data` is not a valid answer under `schema` (a `lab_schema`), or None. The grammar makes this hold;
    it is checked again because a user's own prompt template, or a cut answer, could still bring anything."""
    if not isinstance(data, list):
        return f"the answer is a JSON {type(data).__name__}, not a list of tests"
    if len(data) > schema["maxItems"]:
        return f"{len(data)} tests, more than the {schema['maxItems']} allowed"
    props = schema["items"]["properties"]
    for i, row in enumerate(data, 1):
        if not isinstance(row, dict):
            return f"test {i} is a JSON {type(row).__name__}, not an object"
        if set(row) != set(FIELDS):
            missing, extra = sorted(set(FIELDS) - set(row)), sorted(set(row) - set(FIELDS))
            return f"test {i} has " + "; ".join(
                ([f"no {', '.join(missing)}"] if missing else []) + ([f"extra {', '.join(extra)}"] if extra else []))
        for name, value in row.items():
            if value is None and name not in NEVER_NULL:
                continue
            if not isinstance(value, str):
                return f"test {i}: {name} is {json.dumps(value)[:40]}, not a string"
            spec = props[name] if name in NEVER_NULL else props[name]["anyOf"][0]
            if not spec.get("minLength", 0) <= len(value) <= spec["maxLength"]:
                return f"test {i}: {name} has {len(value)} characters"
    return None


def read_rows(answer: str, schema: dict[str, Any], stopped: str = "eos") -> tuple[list[dict[str, Any]] | None,
                                                                                   str | None]:
    """The tests in one page's answer, or (None, why). The JSON may come inside ```json fences (tolerated, as the
    notes recommend: the recipe does not say whether the model fences it); nothing is repaired."""
    text = answer.strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
    if fenced:
        text = fenced.group(1)
    elif text.startswith("```"):
        text = text.removeprefix("```json").removeprefix("```")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if stopped in CUT_SHORT:  # a longer budget (which also widens the context) would have let it finish
            return None, f"the answer is not complete JSON (stopped at {stopped}); raise --max-tokens"
        if stopped == "grammar":  # more tokens would not help: the grammar allowed none
            return None, f"the answer is not JSON ({e.msg} at character {e.pos}; the grammar allowed nothing more)"
        return None, f"the answer is not JSON ({e.msg} at character {e.pos})"
    why = check_rows(data, schema)
    return (None, why) if why else (data, None)


@dataclass
class Document:
    """One input, checked before the model loads: what it is and which of its pages will be read."""
    path: Path
    kind: str  # document (a PDF) | dicom-pdf | image (a scanned page)
    numbers: list[int]  # 1-based numbers of the pages to read: of the first max_pages, those that render
    total: int  # pages it has
    notes: list[str] = field(default_factory=list)  # pages left out, and why

    @property
    def pages(self) -> int:
        """How many pages will be read."""
        return len(self.numbers)


@dataclass
class PageResult:
    file: str
    page: int  # 1-based, within its file
    rows: list[dict[str, Any]] | None  # the tests as the model gave them; None when the answer did not parse
    error: str | None  # why the answer gave no rows
    answer: str  # the model's text, as it came
    stopped: str  # eos | max_tokens | context_full | grammar; not_read: the page could not be rendered (error)
    tokens: dict[str, int] = field(default_factory=dict)  # prompt, completion
    seconds: float = 0.0


@dataclass
class LabReport:
    pages: list[PageResult]
    rows: list[dict[str, Any]]  # every page's tests in page order: file, page, then the eight fields
    files: list[dict[str, Any]]  # path, kind, pages read, pages in the file
    warnings: list[str]
    model: dict[str, Any]
    schema: dict[str, Any]
    written: str | None = None

    @property
    def failed(self) -> list[PageResult]:
        return [p for p in self.pages if p.error is not None]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def merge(pages: list[PageResult]) -> list[dict[str, Any]]:
    """The pages' tests as one table, in the order of the pages given, each row tagged with its file and page."""
    return [{"file": p.file, "page": p.page, **{name: row.get(name) for name in FIELDS}}
            for p in pages for row in p.rows or []]


def output_format(path: Path) -> str:
    """json or csv, from --out's suffix (checked before any work)."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise InputError(path, "--out writes .json (pages and merged rows) or .csv (merged rows); name it so")
    return suffix[1:]


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The merged rows as CSV: file, page, then the eight fields; a null is an empty cell."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row[c] for c in CSV_COLUMNS])
    return buf.getvalue()


def write_report(report: LabReport, path: Path) -> None:
    """JSON (every page, with its answer or why it failed, and the merged rows) or CSV (the merged rows), written
    whole or not at all."""
    from medgemma_cli.atomic import replace_text, write_errors

    fmt = output_format(path)
    text = csv_text(report.rows) if fmt == "csv" else json.dumps(
        {**report.as_dict(), "written": str(path)}, indent=2, ensure_ascii=False) + "\n"
    with write_errors(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        replace_text(Path(path), text)
    report.written = str(path)


def plan_documents(files: list[Path], max_pages: int = MAX_PAGES) -> list[Document]:
    """Every file checked to be a document and the pages that will be read counted, before the model loads: a
    chest X-ray, a blank scan or an unreadable file is one line naming it, not a failure an hour into the run.
    A scanned page is decoded here (and again when read: holding every scan would cost memory); a PDF's pages
    are sized and their drawing instructions measured, not drawn."""
    from medgemma_cli.inputs import dicom, documents
    from medgemma_cli.inputs.walk import kind_of

    if not files:
        raise MedgemmaError(f"name the lab reports to read ({DOCUMENTS})")
    out = []
    for f in map(Path, files):
        if f.is_dir():
            raise InputError(f, f"a folder; name the documents in it ({DOCUMENTS})")
        if not f.exists():
            raise InputError(f, "no such file")
        kind = kind_of(f)
        if kind == "image":
            scanned_page(f)
            out.append(Document(f, "image", [1], 1))
            continue
        if kind == "note" and f.suffix.lower() == ".pdf":
            out.append(Document(f, "document", *_pdf_plan(f, f, max_pages)))
            continue
        if kind == "dicom":
            ds = dicom.read(f, pixels=False)
            if documents.is_encapsulated_pdf(ds):
                out.append(Document(f, "dicom-pdf", *_pdf_plan(documents.encapsulated_pdf(ds, f), f, max_pages)))
                continue
            what = f"a DICOM {ds.get('Modality') or 'object'} object"
        else:
            what = {"note": "a text note", "slide": "a whole slide"}.get(kind or "", "not a file we read")
        raise InputError(f, f"{what}, not a document: extract labs reads {DOCUMENTS}")
    return out


def _pdf_plan(source: Path | bytes, path: Path, max_pages: int) -> tuple[list[int], int, list[str]]:
    from medgemma_cli.inputs import documents

    numbers, notes = documents.planned_pages(source, path, max_pages)
    return numbers, documents.page_count(source, path), notes


def scanned_page(path: Path) -> Any:
    """A scanned page as RGB; one line naming it if it cannot be read or is blank."""
    from medgemma_cli.inputs import dicom
    from medgemma_cli.inputs.images import load_rgb

    rgb = load_rgb(path)
    if dicom.is_flat(rgb):
        raise InputError(path, "the image is blank: every pixel has the same value")
    return rgb


def page_images(doc: Document, size: int) -> Iterator[tuple[int, Any, str | None]]:
    """The document's planned pages, one at a time, as (number, the model's square input, None), or (number,
    None, why) for a page that cannot be read now (the file changed since it was planned, PDFium failed on it):
    that page is lost, not the run. PDF pages are rendered to fit and zero-padded (documents.py); a scanned page
    is zero-padded to a centred square and resized, as the serving code pads."""
    from medgemma_cli.inputs import dicom, documents
    from medgemma_cli.inputs.images import pad_to_square, resize_square

    if doc.kind == "image":
        try:
            yield 1, resize_square(pad_to_square(scanned_page(doc.path)), size), None
        except InputError as e:
            yield 1, None, e.problem
        return
    try:
        source: Path | bytes = doc.path
        if doc.kind == "dicom-pdf":
            source = documents.encapsulated_pdf(dicom.read(doc.path, pixels=False), doc.path)
        with documents.open_pdf(source, doc.path) as pdf:
            for number in doc.numbers:
                try:
                    rgb = documents.render_page(pdf, number, doc.path, size)
                except InputError as e:
                    yield number, None, e.problem
                    continue
                yield number, rgb, None
    except InputError as e:  # the file itself no longer opens: each page still to read says why
        for number in doc.numbers:
            yield number, None, e.problem


PageCallback = Callable[[int, int, Path, int, PageResult | None], None]


def extract_labs(files: list[Path], *, model: Path | None = None, gguf: Path | None = None,
                 mmproj: Path | None = None, options: Any = None, max_pages: int = MAX_PAGES,
                 schema: dict[str, Any] | None = None, out: Path | None = None,
                 on_page: PageCallback | None = None, on_text: Callable[[str], None] | None = None) -> LabReport:
    """The lab tests on every page of `files` (PDFs, scanned pages, DICOM Encapsulated PDF), one model call per
    page, merged in page order. `options` is an AskOptions (max_tokens defaults to the recipe's LABS_TOKENS);
    `schema` replaces `lab_schema()` (tests bound it tighter). `on_page(index, total, file, page, result)` is told
    before each page (result None) and after it; a page that cannot be rendered then is a failed page (stopped
    "not_read"), not the end of the run. With `out` (.json or .csv), checked writable before the model loads, the
    report is written there, whole, once every page is done; a failure before that leaves nothing behind."""
    from medgemma_cli.answering import AskOptions, TokenCounter, plan_context
    from medgemma_cli.atomic import check_writable
    from medgemma_cli.checksums import sha256_file
    from medgemma_cli.inputs.collect import Collected, PromptImage
    from medgemma_cli.llama.caches import open_cache
    from medgemma_cli.llama.engine import Engine
    from medgemma_cli.llama.grammar import json_answer, max_chars
    from medgemma_cli.llama.memory import check_memory, estimate_memory
    from medgemma_cli.llama.model_files import resolve_model
    from medgemma_cli.llama.session import PrefixSession
    from medgemma_cli.printable import printable
    from medgemma_cli.recipes import LABS_TOKENS, template, token_budget

    if out is not None:
        output_format(out)
        check_writable(out)  # before the model loads, not after the last page
    if max_pages < 1:
        raise MedgemmaError("--max-pages must be at least 1")
    opts = AskOptions(**(options or AskOptions()).__dict__)
    schema = schema or lab_schema()
    docs = plan_documents(files, max_pages)
    model_files = resolve_model(model, gguf, mmproj)
    if not model_files.vision:
        raise MedgemmaError(f"{model_files.name} has no vision projector (mmproj): lab reports are read as page images")
    size, image_tokens = int(model_files.vision["image_size"]), int(model_files.vision["image_tokens"])
    prompt = template("labs").strip()
    one_page = Collected(images=[PromptImage(_blank_page(size), None, docs[0].path)])
    counter = TokenCounter(model_files)
    if opts.max_tokens is None and not opts.think:
        # the recipe's budget, or what the model's context leaves after the page and the prompt (a small model)
        limit = min(opts.ctx or counter.n_ctx_train, counter.n_ctx_train)
        need = plan_context(prompt, one_page, model_files, AskOptions(**{**opts.__dict__, "max_tokens": 1}),
                            counter, image_tokens).prompt_tokens
        opts.max_tokens = max(1, min(LABS_TOKENS, limit - need))
    opts.max_tokens = token_budget(opts.max_tokens, opts.think, True, LABS_TOKENS)
    fit = plan_context(prompt, one_page, model_files, opts, counter, image_tokens)
    memory = estimate_memory(model_files, fit.n_ctx, 1, kv_type=opts.kv_type, swa_full=False,
                             vision_backend=opts.vision_backend, gpu_layers=opts.gpu_layers)
    if opts.on_estimate is not None:
        opts.on_estimate(memory)
    if opts.memory_check:
        check_memory(memory)
    constraint = json_answer(schema, opts.think, reserve=min(opts.max_tokens // 2, max_chars(schema) or 0))
    engine = Engine(model_files, n_ctx=fit.n_ctx, threads=opts.threads, gpu_layers=opts.gpu_layers,
                    verbose=opts.verbose, vision_backend=opts.vision_backend, kv_type=opts.kv_type, swa_full=False,
                    cache=open_cache(opts.cache_gb) if opts.cache else None)
    pages: list[PageResult] = []
    warnings = [f"{printable(d.path.name)}: {n}" for d in docs for n in d.notes]
    total = sum(d.pages for d in docs)
    read = {id(d): 0 for d in docs}  # pages rendered and sent to the model, per document
    try:
        for doc in docs:
            for number, rgb, unread in page_images(doc, size):
                if on_page is not None:
                    on_page(len(pages) + 1, total, doc.path, number, None)
                t0 = time.perf_counter()
                if unread is not None:
                    pages.append(PageResult(str(doc.path), number, None, unread, "", "not_read"))
                    if on_page is not None:
                        on_page(len(pages), total, doc.path, number, pages[-1])
                    continue
                read[id(doc)] += 1
                session = PrefixSession(engine, Collected(images=[PromptImage(rgb, None, doc.path)]),
                                        opts.system_text())
                session.start()
                turn = session.ask(prompt, opts.max_tokens, opts.temperature, opts.seed, opts.show_thinking, on_text,
                                   constraint=constraint)
                rows, error = read_rows(turn.answer, schema, turn.stopped)
                page = PageResult(str(doc.path), number, rows, error, turn.answer, turn.stopped,
                                  {"prompt": turn.prompt_tokens, "completion": turn.completion_tokens},
                                  round(time.perf_counter() - t0, 3))
                pages.append(page)
                if on_page is not None:
                    on_page(len(pages), total, doc.path, number, page)
        report = LabReport(pages, merge(pages),
                           [{"path": str(d.path), "sha256": sha256_file(d.path), "kind": d.kind,
                             "pages_read": read[id(d)], "pages": d.total} for d in docs],
                           warnings,
                           {"name": model_files.name, "n_ctx": engine.n_ctx, "vision_backend": engine.vision_backend,
                            "max_tokens": opts.max_tokens, "images_encoded": engine.images_encoded},
                           schema)
    finally:
        engine.close()
    if out is not None:
        write_report(report, out)
    return report


def _blank_page(size: int) -> Any:
    """A stand-in page for planning the context (only the number of images counts there)."""
    import numpy as np

    return np.zeros((size, size, 3), np.uint8)
