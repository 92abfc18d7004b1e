"""`medgemma batch`: a folder of scans → one record per (unit, question), appended as it goes, resumable.

Units are series (default), studies or single files. Each unit's images are rendered once and every question
is answered from that one encoding. Records go to JSONL or CSV, one line each, written and flushed as each
answer finishes; a re-run skips what is already there (a line torn by a kill is cut away first), and a bad
unit becomes an error record, never the end of the batch. Records carry no patient names, IDs or dates
unless asked; unit ids are DICOM UIDs, or hashes of relative paths for other files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medgemma_cli.answering import AskOptions
from medgemma_cli.batch.local import answer_locally
from medgemma_cli.batch.prepare import Prepared
from medgemma_cli.batch.records import Recorder, RecordFile, lock_path, run_key
from medgemma_cli.batch.remote import ChatServer, answer_by_server, png_data_uri
from medgemma_cli.batch.report import save_thumbnail, thumbnails_dir
from medgemma_cli.batch.units import Unit, make_units, pair_priors, pseudonym, unit_id_key, unit_key_path
from medgemma_cli.batch.worker import EngineConfig, ModelWorker
from medgemma_cli.defaults import DEFAULT_BATCH_CTX
from medgemma_cli.errors import InputError, MedgemmaError
from medgemma_cli.estimate import Estimate, estimate, known_speeds
from medgemma_cli.inputs.collect import Collected, collect, combine_studies
from medgemma_cli.inputs.walk import IMAGE_INPUTS, walk
from medgemma_cli.printable import printable

MAX_CTX = 131072  # Gemma 3's longest context
MIN_BATCH_CTX = 2048  # a unit of one image: still room for a long question and answer
IMAGE_OVERHEAD_TOKENS = 8  # an image's markers, blank lines and its slice label
QUESTION_TOKENS = 512  # the turn markers, an optional system prompt and the question


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
    to_retry: int = 0  # this run's retryable error records (server down, 5xx, timeout): the next run retries them
    retrying: int = 0  # earlier runs' retryable error records, tried again by this run
    context: int = 0  # the context each unit was planned for (--ctx, or less where the server holds less)


def context_for(units: list[Unit], opts: AskOptions, image_tokens: int, text_model: Path) -> int:
    """The context a local batch loads: room for its largest unit's images (at most --max-slices), a question and
    the answer, rounded up, within what the model was trained for."""
    from medgemma_cli.kernels.ggml import read_gguf_info

    trained = int(read_gguf_info(text_model, keys={"gemma3.context_length"}).get("gemma3.context_length",
                                                                                  DEFAULT_BATCH_CTX))
    images = min(max((u.images + (u.prior.images if u.prior else 0) for u in units if not u.error), default=0),
                 opts.max_slices)
    need = images * (image_tokens + IMAGE_OVERHEAD_TOKENS) + opts.budget(True) + QUESTION_TOKENS
    return min(max(MIN_BATCH_CTX, -(-need // 256) * 256), trained, MAX_CTX)


def own_outputs(results: Path) -> set[Path]:
    """What a run writes beside its results: never read back as inputs (thumbnails are JPEGs)."""
    results = Path(results).resolve()
    return {results, lock_path(results), unit_key_path(results), thumbnails_dir(results)}


def run_batch(folder: Path, questions: list[str], out: Path, *, fmt: str = "jsonl", unit: str = "series",
              model: Path | None = None, gguf: Path | None = None, mmproj: Path | None = None,
              options: AskOptions | None = None, include_phi: bool = False, classify: ClassifyOptions | None = None,
              server: ServerOptions | None = None, retry_failed: bool = False,
              on_progress: Callable[[int, int, str], None] | None = None, with_prior: bool = False,
              on_wait: Callable[[Estimate], None] | None = None) -> BatchSummary:
    """Answer every question about every unit under `folder`, appending records to `out` as they finish.

    `retry_failed` first removes earlier error records (a server that was down, a file since fixed), so those
    units are tried again and each (unit, question) still has exactly one record.

    `with_prior` (study units) sends each chest X-ray study after the same patient's most recent earlier study
    in the folder (`units.pair_priors`); the pairing reads patient identifiers and dates, which stay here."""
    t_start = time.perf_counter()
    questions = list(dict.fromkeys(q.strip() for q in questions if q.strip()))
    if not questions:
        raise MedgemmaError("give at least one question (--question or --questions FILE)")
    if fmt not in ("jsonl", "csv"):
        raise MedgemmaError("--format is jsonl or csv")
    if with_prior and unit != "study":
        raise MedgemmaError("--with-prior pairs studies: use it with --unit study")
    opts = options or AskOptions()
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "not a folder")
    n_ctx = min(opts.ctx or DEFAULT_BATCH_CTX, MAX_CTX)
    worker = None
    image_size: int | None

    if server is not None:
        if server.workers < 1:
            raise MedgemmaError("--workers must be at least 1")
        client = ChatServer(server.url, server.model, timeout=server.timeout, image_tokens=server.image_tokens)
        model_name = client.resolve_model()
        info = client.describe()
        client.use_native(info)
        # a question may wait behind our other workers' and, on a server that runs several slots, share its time
        # with as many requests (other clients' too): its limit is widened that much (pace.py)
        client.pace.sharing = max(server.workers, info.slots or 1)
        image_size, image_tokens = server.image_size, server.image_tokens
        if info.n_ctx is not None:  # the server's limit, not ours, decides how many slices fit
            n_ctx = min(opts.ctx or info.n_ctx, info.n_ctx)
            if n_ctx - opts.budget(True) - QUESTION_TOKENS < image_tokens + IMAGE_OVERHEAD_TOKENS:
                raise MedgemmaError(
                    f"{client.base} holds {info.n_ctx} tokens per request"
                    + (f" (its context divided by {info.slots} slots)" if info.slots and info.slots > 1 else "")
                    + f"; one image ({image_tokens} tokens), --max-tokens {opts.budget(True)} and the text need "
                    f"{image_tokens + IMAGE_OVERHEAD_TOKENS + opts.budget(True) + QUESTION_TOKENS}: give the server "
                    "a larger context (llama-server "
                    "-c, fewer --parallel) or lower --max-tokens")
    else:
        from medgemma_cli.llama.memory import check_memory, estimate_memory
        from medgemma_cli.llama.model_files import resolve_model

        files = resolve_model(model, gguf, mmproj)
        model_name = files.name
        image_size = files.vision["image_size"] if files.vision else None
        image_tokens = files.vision["image_tokens"] if files.vision else 0
    records = None
    try:
        w = walk(folder, IMAGE_INPUTS, ours=own_outputs(out))
        units = make_units(folder, w.files, unit)
        if with_prior:
            pair_priors(units)
        if server is None:
            if opts.ctx is None:  # the context the largest unit needs (up to the recipe's slices), not a fixed cut
                n_ctx = context_for(units, opts, image_tokens, files.text)
            # several questions are answered from one prefix, which needs the full-size cache; one needs its window
            swa_full = len(questions) > 1
            memory = estimate_memory(files, n_ctx, 1 if image_size else 0, kv_type=opts.kv_type, swa_full=swa_full,
                                     vision_backend=opts.vision_backend, gpu_layers=opts.gpu_layers)
            if opts.on_estimate is not None:
                opts.on_estimate(memory)
            if opts.memory_check:
                check_memory(memory)
            # the model loads in its own process while this one opens the records and hashes the model file
            worker = ModelWorker(EngineConfig(files, n_ctx, opts.threads, opts.gpu_layers, opts.vision_backend,
                                              opts.verbose, opts.kv_type, opts.cache_gb if opts.cache else None,
                                              swa_full=swa_full))
            worker.start()
        records = RecordFile(out, fmt, retry_failed)  # the lock first: the key and the records are this run's
        if not include_phi:  # DICOM UIDs identify the patient's study; records carry keyed hashes of them
            key = unit_id_key(out, has_records=bool(records.done))
            for u in units:
                u.id = pseudonym(key, u.id)
        if server is not None:
            identity = info.identity(model_name)
        else:
            from medgemma_cli.checksums import sha256_file

            identity = sha256_file(files.text)[:16]
        zero_shot = None
        if classify is not None:
            from medgemma_cli.siglip import ZeroShot

            zero_shot = ZeroShot(classify.labels, model=classify.model, template=classify.template,
                                 softmax=classify.softmax, threads=classify.threads)
            identity += "\nclassify:" + zero_shot.identity()

        if opts.schema is not None:  # a different schema, or thinking, is a different answer
            identity += "\nschema:" + json.dumps(opts.schema, sort_keys=True)
        if opts.think:
            identity += "\nthink"
        if with_prior:
            identity += "\nwith-prior"
        keys = {q: run_key(identity, q) for q in questions}
        writer = Recorder(records, folder, keys, model_name, include_phi, parse_json=opts.schema is not None)
        done_before = sum(1 for u in units for k in keys.values() if (u.id, k) in records.done)
        todo = [u for u in units if writer.pending(u)]
        per_image = image_tokens + IMAGE_OVERHEAD_TOKENS
        max_slices = (max(1, min(opts.max_slices, (n_ctx - opts.budget(True) - QUESTION_TOKENS) // per_image))
                      if image_size else 0)

        def prepare(u: Unit) -> Prepared:
            if u.error:
                return Prepared(u, None, u.error)
            try:
                def read(files: list[Path], slices: int) -> Collected:
                    return collect(files, image_size, slices, keep_full=zero_shot is not None,
                                   scrub_identifiers=not include_phi, magnification=opts.magnification,
                                   max_patches=min(opts.max_patches, slices))

                inputs = (combine_studies(read(u.prior.files, max(1, max_slices // 2)),
                                          read(u.files, max(1, max_slices // 2)), opts.label_timepoints)
                          if u.prior is not None else read(u.files, max_slices))
                images = [img.rgb for img in inputs.images]
                if inputs.slides:  # a slide's overview with the patches sent outlined, not four of its patches
                    save_thumbnail(Path(out), u.id, [s.overview for s in inputs.slides], keep_aspect=True)
                else:
                    save_thumbnail(Path(out), u.id, images)
                uris = []
                if server is not None:
                    uris = [png_data_uri(rgb) for rgb in images]
                return Prepared(u, inputs, None, uris)
            except InputError as e:
                return Prepared(u, None, printable(f"{Path(e.path).name if e.path else ''}: {e.problem}".strip(": ")))
            except Exception as e:  # noqa: BLE001 - a bad unit must not stop the batch
                return Prepared(u, None, f"{type(e).__name__}: {e}")

        model_seconds = worker_seconds = worker_idle = 0.0
        if server is not None:
            model_seconds = answer_by_server(client, server.workers, todo, prepare, opts, writer, zero_shot,
                                              on_progress)
        elif todo and worker is not None:
            worker.wait_ready()
            speeds = known_speeds(worker.speeds_key)
            if on_wait is not None and speeds is not None:  # from this machine's earlier runs of the model
                images = [min(u.images, max_slices) if image_size else 0 for u in todo if not u.error]
                on_wait(estimate(speeds, sum(images), sum(n * per_image + QUESTION_TOKENS for n in images),
                                     image_tokens))
            local = answer_locally(worker, todo, prepare, opts, writer, zero_shot, on_progress)
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
                        worker_seconds, worker_idle, records.errors, writer.retryable, records.retrying, n_ctx)
