"""The `medgemma` command: parse arguments, call one library function, print."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from medgemma_cli import __version__
from medgemma_cli.atomic import replace_text
from medgemma_cli.cli_options import (
    Backend,
    CacheSize,
    Gguf,
    GpuLayers,
    IncludePhi,
    Json,
    KvCache,
    KvType,
    LabelTimepoints,
    Magnification,
    MaxPatches,
    MaxSlices,
    MaxTokens,
    Mmproj,
    Model,
    NoCache,
    NoMemoryCheck,
    Prior,
    RecordFormat,
    Schema,
    Seed,
    ShowThinking,
    SlideMagnification,
    System,
    Temperature,
    Think,
    Threads,
    UnitKind,
    VisionBackend,
    VisionOnnx,
    WithMetadata,
    flag,
)
from medgemma_cli.console import PromptProgress, RichProgress, err, human_bytes, out, shown
from medgemma_cli.containment import signal_name
from medgemma_cli.defaults import DEFAULT_CACHE_GB, DEFAULT_CHAT_CTX, MAX_PAGES, MAX_PATCHES, MAX_SLICES
from medgemma_cli.errors import MedgemmaError
from medgemma_cli.kernels.policy import DEFAULT_MMPROJ_TYPE, DEFAULT_PRESET, MMPROJ_TYPES, PRESETS
from medgemma_cli.stopping import Terminated

app = typer.Typer(
    name="medgemma",
    help="MedGemma and MedSigLIP on your own machine: private, offline, fast.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
_DEBUG = False
MEMORY_WORTH_SAYING = 0.25  # of the available memory: below it the expected peak is not printed (--json has it)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One-line errors and a non-zero exit; the traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MedgemmaError as e:
            if _DEBUG:
                raise
            err.print(f"[bold red]error:[/] {shown(e)}", soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was left half-written")
            raise typer.Exit(130) from None
        except Terminated as e:
            err.print(f"stopped ({signal_name(e.signum)}); nothing was left half-written")
            raise typer.Exit(128 + e.signum) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as e:  # the last line of defence for users
            if _DEBUG:
                raise
            err.print(f"[bold red]error:[/] unexpected {type(e).__name__}: {shown(e)} (rerun with --debug for details)",
                      soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _say_memory(estimate: Any) -> None:
    """The expected peak memory, printed before the model loads when it is a sizeable share of what the machine
    has available (the run is refused above it); a small model's line would only crowd the output."""
    if estimate.peak >= MEMORY_WORTH_SAYING * estimate.available:
        err.print(f"[dim]{estimate.summary()}[/]")


def _version(value: bool) -> None:
    if value:
        out.print(f"medgemma-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (also accepted after the command)."),
) -> None:
    global _DEBUG
    _DEBUG = _DEBUG or debug
    if not _DEBUG:  # pydicom's complaints about header values: what matters is reported by us, naming the file
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


@app.command()
@_guard
def convert(
    src: Path = typer.Argument(
        ..., help="Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.model or tokenizer.json)."),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Output folder \\[default: the model store]."),
    quant: str | None = typer.Option(
        None, "--quant",
        help=f"MedGemma preset: {', '.join(PRESETS)} \\[default: {DEFAULT_PRESET}]; "
             "MedSigLIP: fp32, int8, q4 \\[default: int8]."),
    mmproj_quant: str = typer.Option(DEFAULT_MMPROJ_TYPE, "--mmproj-quant",
                                     help=f"Vision projector type: {', '.join(MMPROJ_TYPES)}."),
    force: Annotated[bool, flag("--force", "Replace existing files in the output folder.")] = False,
    imatrix: Path | None = typer.Option(None, "--imatrix", help="Importance matrix (llama.cpp's GGUF or .dat format)."),
    vision_onnx: Annotated[VisionOnnx, typer.Option(
        "--vision-onnx", case_sensitive=False,
        help="Also write MedGemma's vision tower as vision.onnx for fast CPU image encoding.")] = VisionOnnx.int8,
    threads: int | None = typer.Option(None, "--threads", "-t", help="Quantization threads \\[default: all cores]."),
    as_json: Json = False,
) -> None:
    """Convert a checkpoint: MedGemma → GGUF for llama.cpp (+ vision.onnx); MedSigLIP → ONNX.

    One pass: each tensor is read, quantized by ggml's own kernels and written, so memory stays small whatever
    the model size and nothing intermediate touches the disk; files appear only when complete and verified.

    [bold]Examples[/]

      medgemma convert ~/models/medgemma-4b-it
      medgemma convert ~/models/medgemma-4b-it --out ./medgemma-4b-q8 --quant Q8_0
      medgemma convert ~/models/medgemma-27b-text-it --quant Q5_K_M
      medgemma convert ~/models/medgemma-4b-it --imatrix imatrix.gguf
      medgemma convert ~/models/medsiglip-448 --quant int8
    """
    from medgemma_cli.conversion import convert as run_convert

    progress = None if as_json else RichProgress()
    result = run_convert(src, out_dir, preset=quant.upper() if quant else None, mmproj_type=mmproj_quant.upper(),
                         overwrite=force, threads=threads, imatrix=imatrix, vision_onnx=vision_onnx.value,
                         progress=progress)
    if as_json:
        out.print_json(json.dumps({"path": str(result.path), **result.manifest}))
        return
    from rich.table import Table

    table = Table(title=f"Converted to {result.path}", title_justify="left")
    for col in ("file", "size", "tensors", "types", "sha256"):
        table.add_column(col, justify="right" if col in ("size", "tensors") else "left")
    for name, f in result.manifest["files"].items():
        types = ", ".join(f"{k}×{v}" for k, v in f.get("tensor_types", {}).items()) or f.get("preset", "")
        table.add_row(name, human_bytes(f["size"]), str(f.get("tensors", "")), types, f["sha256"][:16] + "…")
    out.print(table)
    classes = result.manifest.get("quantization", {}).get("classes", {})
    lossy = {k: v for k, v in classes.items() if v["rel_rms"] > 0}
    if lossy:
        q = Table(title="Quantization error (relative RMS of dequantized weights)", title_justify="left")
        for col in ("tensors", "types", "rel. RMS"):
            q.add_column(col, justify="right" if col == "rel. RMS" else "left")
        for k, v in lossy.items():
            q.add_row(k, ", ".join(f"{t}×{n}" for t, n in v["types"].items()), f"{v['rel_rms']:.4f}")
        out.print(q)


@app.command()
@_guard
def ask(
    question: str = typer.Argument(..., help="The question, in quotes."),
    files: list[Path] | None = typer.Argument(
        None, help="DICOM files or series folders, PNG/JPEG images, whole slides, notes (.txt, .md, .pdf)."),
    model: Model = None,
    gguf: Gguf = None,
    mmproj: Mmproj = None,
    system: System = None,
    max_tokens: MaxTokens = None,
    temperature: Temperature = 0.0,
    seed: Seed = 0,
    threads: Threads = None,
    gpu_layers: GpuLayers = None,
    ctx: int | None = typer.Option(None, "--ctx", help="Context size limit \\[default: what the prompt needs]."),
    max_slices: MaxSlices = MAX_SLICES,
    magnification: SlideMagnification = Magnification.x10,
    max_patches: MaxPatches = MAX_PATCHES,
    save_input: Path | None = typer.Option(
        None, "--save-input", help="Write PNGs of exactly the pixels the model receives here."),
    with_metadata: WithMetadata = False,
    think: Think = False,
    show_thinking: ShowThinking = False,
    schema: Schema = None,
    prior: Prior = None,
    label_timepoints: LabelTimepoints = False,
    vision_backend: Backend = VisionBackend.auto,
    include_phi: IncludePhi = False,
    kv_type: KvCache = KvType.f16,
    no_memory_check: NoMemoryCheck = False,
    no_cache: NoCache = False,
    cache_size: CacheSize = DEFAULT_CACHE_GB,
    as_json: Annotated[bool, flag(
        "--json", "Print one JSON object (answer, inputs with SHA-256, tokens, timings, expected memory).")] = False,
) -> None:
    """Ask MedGemma about local DICOM files, series, images and clinical notes; the answer streams as it comes.

    DICOM is rendered as the reference pipeline does (modality/VOI LUTs, CT in three Hounsfield windows, MR
    min–max over the volume, series ordered along the slice normal, at most 85 slices with "SLICE n" labels)
    and every image is resized by us to the model's square input. The patient's identifiers found in the DICOM
    headers are replaced in notes and structured-report text before the model sees them. Whole slides (a DICOM
    WSI series, SVS, NDPI, pyramidal TIFF…) are read as MedGemma 1.5's recipe does: at most 125 tissue patches
    of 896 px from one magnification, in raster order.

    [bold]Examples[/]

      medgemma ask "Describe this chest X-ray." chest.dcm
      medgemma ask "Any acute findings?" ./ct-series/ --system "You are an expert radiologist."
      medgemma ask "Summarise." note.txt report-sr.dcm --json
      medgemma ask "Describe the tissue." slide.tif --magnification 20x --max-patches 40
      medgemma ask "What changed?" scan.png --gguf medgemma-4b-it-Q4_K_M.gguf --mmproj mmproj-F16.gguf
      medgemma ask "List the findings." chest.dcm --schema findings.schema.json --json
      medgemma ask "Is the effusion larger?" chest.dcm --prior chest-2025.dcm
      medgemma ask "Which antibiotic and why?" note.txt --think
    """
    from medgemma_cli.answering import AskOptions, ask as run_ask
    from medgemma_cli.llama.grammar import load_schema

    opts = AskOptions(system=system, max_tokens=max_tokens, temperature=temperature, seed=seed, threads=threads,
                      gpu_layers=gpu_layers, ctx=ctx, with_metadata=with_metadata, show_thinking=show_thinking,
                      max_slices=max_slices, save_input=save_input, verbose=_DEBUG, vision_backend=vision_backend.value,
                      include_phi=include_phi, think=think, schema=load_schema(schema) if schema else None,
                      prior=list(prior or []), label_timepoints=label_timepoints,
                      kv_type=kv_type.value, memory_check=not no_memory_check,
                      on_estimate=None if as_json else _say_memory,
                      magnification=magnification.value, max_patches=max_patches, cache=not no_cache,
                      cache_gb=cache_size)
    progress = None if as_json else PromptProgress()
    if not as_json:
        opts.on_wait = lambda line: err.print(f"[dim]{shown(line)}[/]")

    def stream(piece: str) -> None:
        if progress is not None:  # the progress gives way to the answer
            progress.stop()
        out.print(piece, end="", markup=False, highlight=False)

    try:
        result = run_ask(question, files or [], model=model, gguf=gguf, mmproj=mmproj, options=opts,
                         on_text=None if as_json else stream, progress=progress)
    finally:
        if progress is not None:
            progress.stop()
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        if result.parse_error:
            raise typer.Exit(1)
        return
    out.print()
    for w in result.warnings:
        err.print(f"[yellow]note:[/] {shown(w)}")
    t = result.timings
    err.print(f"[dim]{result.model['name']} · {result.images_sent} image(s) · "
              f"{result.tokens['prompt']} prompt tokens · "
              f"first token {t['first_token_s']:.1f} s (images {t['image_encode_s']:.1f} s) · "
              f"{t['decode_tokens_per_s']:.1f} tokens/s[/]")
    if result.saved_inputs:
        err.print(f"[dim]model inputs saved: {shown(', '.join(result.saved_inputs))}[/]")
    if result.identifiers_removed:
        err.print(f"[dim]{result.identifiers_removed} patient identifier(s) replaced in the notes before the model "
                  "saw them (--include-phi keeps them)[/]")
    if result.parse_error:
        err.print(f"[bold red]error:[/] {shown(result.parse_error)}; raise --max-tokens")
        raise typer.Exit(1)


@app.command()
@_guard
def batch(
    folder: Path = typer.Argument(..., help="A folder of scans (walked recursively; DICOM recognised by content)."),
    question: list[str] | None = typer.Option(None, "--question", "-q", help="A question for every unit (repeatable)."),
    questions_file: Path | None = typer.Option(None, "--questions", help="A file with one question per line."),
    out_file: Path = typer.Option(..., "--out", "-o", help="Results file; re-running the same command resumes it."),
    fmt: Annotated[RecordFormat, typer.Option(
        "--format", case_sensitive=False, help="Results file format.")] = RecordFormat.jsonl,
    unit: Annotated[UnitKind, typer.Option(
        "--unit", case_sensitive=False, help="What one prompt holds: a series, a study or a file.")] = UnitKind.series,
    model: Model = None,
    gguf: Gguf = None,
    mmproj: Mmproj = None,
    system: System = None,
    max_tokens: MaxTokens = None,
    temperature: Temperature = 0.0,
    seed: Seed = 0,
    threads: Threads = None,
    gpu_layers: GpuLayers = None,
    ctx: int | None = typer.Option(None, "--ctx", help="Context per unit; longer series are sampled to fit "
                                   "\\[default: what the folder's largest unit needs, up to --max-slices]."),
    max_slices: MaxSlices = MAX_SLICES,
    magnification: SlideMagnification = Magnification.x10,
    max_patches: MaxPatches = MAX_PATCHES,
    vision_backend: Backend = VisionBackend.auto,
    with_metadata: WithMetadata = False,
    include_phi: IncludePhi = False,
    no_cache: NoCache = False,
    cache_size: CacheSize = DEFAULT_CACHE_GB,
    report: Path | None = typer.Option(
        None, "--report", help="Also write one self-contained HTML file to review the run."),
    classify_labels: list[str] | None = typer.Option(
        None, "--classify", help="Add MedSigLIP probabilities for this label (repeatable)."),
    siglip_model: Path | None = typer.Option(
        None, "--siglip-model", help="Converted MedSigLIP for --classify \\[default: the newest]."),
    classify_template: str | None = typer.Option(None, "--classify-template", help='e.g. "chest x-ray showing {}".'),
    server: str | None = typer.Option(
        None, "--server", help="An OpenAI-compatible server (llama.cpp, vLLM) instead of the local model. "
                                          "API key, if needed, from $MEDGEMMA_API_KEY."),
    server_model: str | None = typer.Option(
        None, "--server-model", help="The model name on the server \\[default: its only one]."),
    workers: int = typer.Option(1, "--workers", "-w", help="Concurrent requests with --server."),
    image_size: int = typer.Option(
        896, "--image-size", help="With --server: the size images are resized to here (MedGemma: 896)."),
    timeout: float = typer.Option(
        600.0, "--timeout",
        help="With --server: the longest wait for one answer (less once the run's answers show what it needs)."),
    retry_failed: Annotated[bool, flag(
        "--retry-failed", "Remove earlier error records from --out and try those units again.")] = False,
    schema: Schema = None,
    think: Think = False,
    with_prior: Annotated[bool, flag(
        "--with-prior", "With --unit study: send each chest X-ray study after the same patient's most recent earlier "
        "study in the folder (patients matched on their IDs here; records name only the prior's unit id).")] = False,
    label_timepoints: LabelTimepoints = False,
    quiet: Annotated[bool, flag("--quiet", "No progress bar; one log line per unit.")] = False,
    kv_type: KvCache = KvType.f16,
    no_memory_check: NoMemoryCheck = False,
) -> None:
    """Answer questions about every series (or study, or file) in a folder; results are written as they come.

    A killed run resumes where it stopped when the same command is run again; a bad unit becomes an error
    record and the batch goes on. Exit code 1 if the results file holds a failed unit (this run's or an
    earlier one's). With [bold]--server[/] the images are
    rendered here and sent (as PNG) only to that server; nothing else leaves the machine.

    [bold]Examples[/]

      medgemma batch ./night-run/ -q "Any acute findings?" --out results.jsonl
      medgemma batch ./cxr/ --questions questions.txt --unit study --out results.csv --format csv
      medgemma batch ./night-run/ -q "Any acute findings?" --out results.jsonl --report review.html
      medgemma batch ./cxr/ -q "Describe the findings." --out r.jsonl --classify effusion --classify "no finding"
      medgemma batch ./night-run/ -q "Any acute findings?" --out r.jsonl --server http://gpu-box:8000 --workers 4
      medgemma batch ./cxr/ -q "List the findings." --schema findings.schema.json --out findings.jsonl
      medgemma batch ./cxr/ -q "Is the effusion better or worse?" --unit study --with-prior --out change.jsonl
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

    from medgemma_cli.answering import AskOptions
    from medgemma_cli.batch import ClassifyOptions, ServerOptions, run_batch
    from medgemma_cli.llama.grammar import load_schema

    qs = list(question or [])
    if questions_file is not None:
        try:
            qs += [ln.strip() for ln in questions_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except OSError as e:
            raise MedgemmaError(f"{questions_file}: cannot read ({e.strerror or e})") from e
    opts = AskOptions(system=system, max_tokens=max_tokens, temperature=temperature, seed=seed, threads=threads,
                      gpu_layers=gpu_layers, ctx=ctx, with_metadata=with_metadata, max_slices=max_slices,
                      vision_backend=vision_backend.value, verbose=_DEBUG, think=think,
                      schema=load_schema(schema) if schema else None, label_timepoints=label_timepoints,
                      kv_type=kv_type.value, memory_check=not no_memory_check,
                      on_estimate=None if quiet else _say_memory,
                      magnification=magnification.value, max_patches=max_patches, cache=not no_cache,
                      cache_gb=cache_size)
    classifier = (ClassifyOptions(classify_labels, siglip_model, classify_template, threads=threads)
                  if classify_labels else None)
    remote = None
    if server is not None:
        from medgemma_cli.batch.remote import is_loopback

        remote = ServerOptions(server, server_model, workers, image_size, timeout=timeout)
        if not is_loopback(server) and not server.lower().startswith("https://"):
            err.print(f"[yellow]note:[/] images go to {shown(server)} unencrypted (http); "
                      "use https beyond this machine")
    elif workers != 1:
        raise MedgemmaError("--workers applies to --server; the local model answers one unit at a time")
    bar = None if quiet else Bar(TextColumn("[bold]units"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.description}"), console=err, transient=True)
    task = None

    def progress(i: int, total: int, unit_id: str) -> None:
        nonlocal task
        if bar is None:
            err.print(f"[{i + 1}/{total}] {unit_id}", markup=False)
            return
        if task is None:  # started here, so errors found before the first unit print without a bar around them
            bar.start()
            task = bar.add_task("", total=total)
        bar.update(task, completed=i, description=unit_id[-24:])

    try:
        s = run_batch(folder, qs, out_file, fmt=fmt.value, unit=unit.value, model=model, gguf=gguf,
                      mmproj=mmproj, options=opts, include_phi=include_phi, classify=classifier, server=remote,
                      retry_failed=retry_failed, on_progress=progress, with_prior=with_prior,
                      on_wait=None if quiet else lambda e: err.print(
                          f"[dim]the whole batch: {shown(e.line())}, answers not counted[/]"))
    finally:
        if bar is not None:
            bar.stop()
    from rich.table import Table

    t = Table(title=f"Batch → {shown(out_file)}", title_justify="left")
    for col in ("units", "records written", "already done", "failed", "skipped files", "time"):
        t.add_column(col, justify="right")
    t.add_row(str(s.units), str(s.records_written), str(s.done_before), str(s.failed), str(len(s.skipped)),
              f"{s.seconds:.1f} s")
    captions = []
    if s.retried:
        captions.append(f"{s.retried} earlier error record(s) removed and tried again")
    if s.retrying:
        captions.append(f"{s.retrying} earlier request(s) the server failed (unreachable, 5xx, timeout) tried again")
    t.caption = "; ".join(captions) or None
    out.print(t)
    if report is not None:
        from medgemma_cli.batch.report import write_report

        write_report(out_file, report)
        out.print(f"report: {shown(report)}")
    for path, why in s.skipped[:20]:
        err.print(f"[dim]skipped {shown(path)}: {shown(why)}[/]")
    if len(s.skipped) > 20:
        err.print(f"[dim]… and {len(s.skipped) - 20} more skipped[/]")
    if s.to_retry:
        err.print(f"[yellow]note:[/] the server failed {s.to_retry} request(s) (unreachable, 5xx, timeout); running "
                  "the same command again tries them again")
    if s.failed or s.errors_in_file:
        if not s.failed:
            err.print(f"[yellow]note:[/] {shown(out_file)} holds {s.errors_in_file} error record(s) from earlier runs "
                      "(--retry-failed tries those units again)")
        raise typer.Exit(1)


@app.command()
@_guard
def chat(
    files: list[Path] | None = typer.Argument(None, help="DICOM files or series folders, images, notes."),
    model: Model = None,
    gguf: Gguf = None,
    mmproj: Mmproj = None,
    system: System = None,
    max_tokens: MaxTokens = None,
    temperature: Temperature = 0.0,
    seed: Seed = 0,
    threads: Threads = None,
    gpu_layers: GpuLayers = None,
    ctx: int = typer.Option(
        DEFAULT_CHAT_CTX, "--ctx",
        help="Context for the whole conversation; old turns are dropped (with a notice) beyond it."),
    max_slices: MaxSlices = MAX_SLICES,
    magnification: SlideMagnification = Magnification.x10,
    max_patches: MaxPatches = MAX_PATCHES,
    with_metadata: WithMetadata = False,
    vision_backend: Backend = VisionBackend.auto,
    include_phi: IncludePhi = False,
    think: Think = False,
    show_thinking: ShowThinking = False,
    prior: Prior = None,
    label_timepoints: LabelTimepoints = False,
    kv_type: KvCache = KvType.f16,
    no_memory_check: NoMemoryCheck = False,
    no_cache: NoCache = False,
    cache_size: CacheSize = DEFAULT_CACHE_GB,
) -> None:
    """Talk about the same images and notes: they are encoded once, follow-up questions reuse them.

    Type a question and press Enter. [bold]/save FILE[/] writes the transcript (questions, answers, input
    checksums; no paths, no patient identifiers), [bold]/quit[/] or Ctrl-D ends.

    [bold]Example[/]

      medgemma chat chest.dcm note.txt --system "You are an expert radiologist."
      medgemma chat chest.dcm --prior chest-2025.dcm
    """
    from medgemma_cli.answering import AskOptions, open_session

    opts = AskOptions(system=system, max_tokens=max_tokens, temperature=temperature, seed=seed, threads=threads,
                      gpu_layers=gpu_layers, ctx=ctx, with_metadata=with_metadata, verbose=_DEBUG,
                      max_slices=max_slices, vision_backend=vision_backend.value, include_phi=include_phi,
                      think=think, show_thinking=show_thinking, prior=list(prior or []),
                      label_timepoints=label_timepoints,
                      kv_type=kv_type.value, memory_check=not no_memory_check, on_estimate=_say_memory,
                      magnification=magnification.value, max_patches=max_patches,
                      on_wait=lambda line: err.print(f"[dim]{shown(line)}[/]"), cache=not no_cache,
                      cache_gb=cache_size)
    progress = PromptProgress()
    try:
        conversation = open_session("?", files or [], model=model, gguf=gguf, mmproj=mmproj, options=opts,
                                    extra_tokens=max(0, ctx // 2), progress=progress)
    finally:
        progress.stop()
    session = conversation.session
    try:
        for w in session.inputs.warnings + conversation.warnings:
            err.print(f"[yellow]note:[/] {shown(w)}")
        t = session.prefill_timings
        err.print(f"[dim]{conversation.model.name} · {len(session.inputs.images)} image(s) encoded in "
                  f"{t.image_encode_s:.1f} s ({session.engine.vision_backend}) · /save FILE, /quit[/]")
        interactive = sys.stdin.isatty()
        while True:
            try:
                line = input("> " if interactive else "")
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit", "/q"):
                break
            if line.startswith("/save"):
                target = Path(line[5:].strip() or "medgemma-chat.json")
                try:
                    replace_text(target, json.dumps(session.transcript(), indent=2, ensure_ascii=False) + "\n")
                except OSError as e:  # a bad path must not end the conversation
                    err.print(f"[red]error:[/] {shown(target)}: cannot save ({shown(e.strerror or e)})")
                    continue
                err.print(f"[dim]transcript saved to {shown(target)}[/]")
                continue
            if line.startswith("/"):
                err.print("[yellow]commands:[/] /save FILE, /quit")
                continue
            try:
                turn = session.follow_up(line, conversation.max_tokens, temperature, seed, show_thinking,
                                         on_text=lambda piece: out.print(piece, end="", markup=False, highlight=False),
                                         on_notice=lambda msg: err.print(f"[yellow]note:[/] {shown(msg)}"))
            except MedgemmaError as e:  # this question failed; the conversation and its images stay
                err.print(f"[red]error:[/] {shown(e)}")
                continue
            out.print()
            tt = turn.timings
            err.print(f"[dim]first token {tt.first_token_s:.1f} s · {turn.completion_tokens} tokens · "
                      f"images encoded {session.engine.images_encoded} time(s) in total[/]")
    finally:
        conversation.close()


@app.command()
@_guard
def locate(
    args: list[str] = typer.Argument(
        ..., metavar="FINDING... IMAGE", help="What to find (one or more, each in quotes), then the image: DICOM, PNG "
                                              "or JPEG."),
    out_png: Path | None = typer.Option(None, "--out", "-o", help="Write the image with the boxes drawn (PNG)."),
    model: Model = None,
    gguf: Gguf = None,
    mmproj: Mmproj = None,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", help="Longest answer per finding \\[default: the recipe's 1000; 1500 with --think].")] = None,
    temperature: Temperature = 0.0,
    seed: Seed = 0,
    threads: Threads = None,
    gpu_layers: GpuLayers = None,
    think: Think = False,
    show_thinking: ShowThinking = False,
    vision_backend: Backend = VisionBackend.auto,
    as_json: Annotated[bool, flag(
        "--json", "Print one JSON object: each finding's boxes in original pixels, normalised and in mm.")] = False,
) -> None:
    """Where a finding is on a chest X-ray: boxes from MedGemma 1.5's localization recipe, drawn on the image.

    The image is zero-padded to a centred square as in Google's notebook; each finding is asked with the
    recipe's prompt, and a grammar holds the answer to the recipe's shape (reasoning, then
    `Final Answer: ```json[{"box_2d": [y0, x0, y1, x1], "label": …}]``` `). The 0–1000 coordinates are mapped back to
    the original pixels (and mm, from the DICOM pixel spacing). Boxes that are degenerate or lie in the padding
    are reported, not drawn.

    [bold]Examples[/]

      medgemma locate "right clavicle" chest.dcm --out boxes.png
      medgemma locate "right clavicle" "left lung" chest.png --json
    """
    from medgemma_cli.answering import AskOptions
    from medgemma_cli.locate import locate as run_locate

    if len(args) < 2:
        raise typer.BadParameter("give at least one finding and then the image", param_hint="FINDING... IMAGE")
    *findings, image = args
    opts = AskOptions(max_tokens=max_tokens, temperature=temperature, seed=seed, threads=threads,
                      gpu_layers=gpu_layers, think=think, show_thinking=show_thinking, verbose=_DEBUG,
                      vision_backend=vision_backend.value)
    status = None if as_json else err.status("encoding the image, locating…")
    if status is not None:
        status.start()
    try:
        result = run_locate(findings, Path(image), model=model, gguf=gguf, mmproj=mmproj, options=opts, out=out_png)
    finally:
        if status is not None:
            status.stop()
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
        return
    g = result.geometry
    mm = f" · pixel spacing {g['spacing_mm'][0]:g}×{g['spacing_mm'][1]:g} mm ({g['spacing_source']})" \
        if g["spacing_mm"] else ""
    out.print(f"{shown(Path(result.image).name)}: {g['original_width']}×{g['original_height']} pixels{mm}",
              highlight=False)
    for f in result.findings:
        for b in f.boxes:
            p = b.pixels
            size = f" · {b.size_mm['width']:g}×{b.size_mm['height']:g} mm" if b.size_mm else ""
            out.print(f"  {shown(f.finding)}: x {p['x0']:g}–{p['x1']:g}, y {p['y0']:g}–{p['y1']:g} px"
                      f"{size}{' (cut at the image edge)' if b.clipped else ''}", markup=False, highlight=False)
        for why in f.problems:
            err.print(f"  [yellow]{shown(f.finding)}: no box drawn:[/] {shown(why)}")
    for w in result.warnings:
        err.print(f"[yellow]note:[/] {shown(w)}")
    if result.drawn:
        err.print(f"[dim]boxes drawn on the image: {shown(result.drawn)}[/]")


@app.command()
@_guard
def prompts(
    name: str | None = typer.Argument(None, help="Print this template's text (as it will be used)."),
    as_json: Json = False,
) -> None:
    """The wording of MedGemma 1.5's recipes that medgemma sends, where each comes from, and which you replaced.

    To use your own wording, put it in [bold]<MEDGEMMA_HOME>/prompts/NAME.txt[/] (or in the folder
    $MEDGEMMA_PROMPTS names), keeping the template's {placeholders}.

    [bold]Examples[/]

      medgemma prompts
      medgemma prompts locate
    """
    from medgemma_cli.recipes import TEMPLATES, describe, template

    if name is not None:
        if name not in TEMPLATES:
            raise MedgemmaError(f"no template {name!r}; the templates are {', '.join(TEMPLATES)}")
        out.print(template(name), end="" if template(name).endswith("\n") else "\n", markup=False, highlight=False)
        return
    rows = describe()
    if as_json:
        out.print_json(json.dumps(rows))
        return
    from rich.table import Table

    t = Table(title="Prompt templates", title_justify="left")
    for col in ("name", "placeholders", "from", "yours"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["name"]), ", ".join(f"{{{p}}}" for p in r["placeholders"]),
                  str(r["source"]), f"[green]{shown(r['file'])}[/]" if r["replaced"] else f"[dim]{shown(r['file'])}[/]")
    out.print(t)


@app.command()
@_guard
def classify(
    files: list[Path] = typer.Argument(..., help="Images, DICOM files or folders."),
    labels: list[str] = typer.Option(..., "--labels", "-l", help="A candidate finding; repeat --labels for each."),
    template: str | None = typer.Option(
        None, "--template", help='Prompt template with {}, e.g. "chest x-ray showing {}".'),
    softmax: Annotated[bool, flag(
        "--softmax", "Softmax over the labels instead of an independent sigmoid per label.")] = False,
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Converted MedSigLIP folder \\[default: the newest in the store]."),
    threads: int | None = typer.Option(None, "--threads", "-t", help="ONNX Runtime threads."),
    as_json: Json = False,
) -> None:
    """Zero-shot labels with MedSigLIP: a probability per label for each image (sigmoid of cos·exp(scale)+bias).

    [bold]Examples[/]

      medgemma classify chest.png --labels "pleural effusion" --labels pneumothorax --labels "no finding"
      medgemma classify ./cxr/ --labels cardiomegaly --labels edema --template "chest x-ray showing {}" --json
    """
    from medgemma_cli.siglip import classify as run_classify

    results = run_classify(files, labels, model=model, template=template, softmax=softmax, threads=threads)
    if as_json:
        out.print_json(json.dumps([r.__dict__ for r in results]))
        return
    from rich.table import Table

    for r in results:
        name = Path(r.path).name + (f" (frame {r.frame + 1})" if r.frame is not None else "")
        t = Table(title=name, title_justify="left")
        t.add_column("label")
        t.add_column("probability", justify="right")
        for label, p in r.scores.items():
            t.add_row(label, f"{p:.3f}")
        out.print(t)


@app.command()
@_guard
def embed(
    files: list[Path] | None = typer.Argument(None, help="Images, DICOM files or folders."),
    out_file: Path = typer.Option(..., "--out", "-o", help="Output .npz (numpy) or .csv (pandas)."),
    text: list[str] | None = typer.Option(None, "--text", help="Embed these texts instead of images (repeatable)."),
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Converted MedSigLIP folder \\[default: the newest in the store]."),
    threads: int | None = typer.Option(None, "--threads", "-t", help="ONNX Runtime threads."),
) -> None:
    """L2-normalised MedSigLIP embeddings with their source paths, for numpy (.npz) or pandas (.csv).

    [bold]Examples[/]

      medgemma embed ./cxr/ --out cxr.npz
      medgemma embed --text "pleural effusion" --text "normal chest" --out labels.csv
    """
    from medgemma_cli.siglip import embed as run_embed

    if not files and not text:
        raise typer.BadParameter("give image files or --text")
    info = run_embed(files or [], out_file, model=model, text=text, threads=threads)
    out.print(f"{info['count']} {info['kind']} embeddings of {info['dimensions']} dimensions → {shown(info['path'])}")


extract_app = typer.Typer(help="Structured data read off documents by MedGemma 1.5's recipes (lab reports).",
                          no_args_is_help=True)
app.add_typer(extract_app, name="extract")


@extract_app.command("labs")
@_guard
def extract_labs(
    files: list[Path] = typer.Argument(..., help="Lab reports: PDF files, scanned pages (PNG/JPEG), DICOM "
                                                 "Encapsulated PDF."),
    out_file: Path | None = typer.Option(
        None, "--out", "-o", help="Write the results: .json (every page and the merged rows) or .csv (merged rows)."),
    model: Model = None,
    gguf: Gguf = None,
    mmproj: Mmproj = None,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", help="Longest answer per page \\[default: 4096, or what the model's context leaves].")] = None,
    max_pages: Annotated[int, typer.Option(
        "--max-pages", min=1, help="Pages read per document, from the first.")] = MAX_PAGES,
    temperature: Temperature = 0.0,
    seed: Seed = 0,
    threads: Threads = None,
    gpu_layers: GpuLayers = None,
    vision_backend: Backend = VisionBackend.auto,
    kv_type: KvCache = KvType.f16,
    no_memory_check: NoMemoryCheck = False,
    no_cache: NoCache = False,
    as_json: Annotated[bool, flag(
        "--json", "Print the results as one JSON object: each page's tests (or why it gave none), the merged rows.")
    ] = False,
) -> None:
    """The lab tests on each page of lab reports, as rows: MedGemma 1.5's document-extraction recipe.

    Each page is its own call: the page image (rendered to fit 896 px, zero-padded to a square), then the recipe's
    prompt. A grammar holds every answer to a JSON list of tests with the recipe's eight fields (name, result, unit,
    range, panel, method, specimen, sample_collection_time); the pages' tests are merged in page order, each row
    tagged with its file and page. A page whose answer does not parse is said (exit code 1), never dropped.

    [bold]Examples[/]

      medgemma extract labs labs.pdf
      medgemma extract labs labs.pdf --out results.csv
      medgemma extract labs labs.pdf --out results.json
      medgemma extract labs labs.pdf --json
    """
    from medgemma_cli.answering import AskOptions
    from medgemma_cli.labs import FIELDS, PageResult, extract_labs as run_extract

    opts = AskOptions(max_tokens=max_tokens, temperature=temperature, seed=seed, threads=threads,
                      gpu_layers=gpu_layers, verbose=_DEBUG, vision_backend=vision_backend.value, kv_type=kv_type.value,
                      memory_check=not no_memory_check, on_estimate=None if as_json else _say_memory,
                      cache=not no_cache)

    def progress(index: int, total: int, file: Path, page: int, result: PageResult | None) -> None:
        where = f"{shown(file.name)} page {page} ({index}/{total})"
        if result is None:
            err.print(f"[dim]reading {where}…[/]")
        elif result.error is None:
            err.print(f"[dim]{where}: {len(result.rows or [])} test(s), {result.seconds:.1f} s[/]")
        else:
            err.print(f"[yellow]{where}: no tests read:[/] {shown(result.error)}")

    report = run_extract(files, model=model, gguf=gguf, mmproj=mmproj, options=opts, max_pages=max_pages,
                         out=out_file, on_page=progress)
    if as_json:
        out.print_json(json.dumps(report.as_dict()))
    elif out_file is None:
        from rich.table import Table

        t = Table(title=f"{len(report.rows)} lab test(s) from {len(report.pages)} page(s)", title_justify="left")
        for col in ("file", "page", *FIELDS):
            t.add_column(col.replace("sample_collection_time", "collected"))
        for row in report.rows:
            t.add_row(*(shown(Path(row["file"]).name) if c == "file" else "" if row[c] is None else shown(str(row[c]))
                        for c in ("file", "page", *FIELDS)))
        out.print(t)
    for w in report.warnings:
        err.print(f"[yellow]note:[/] {shown(w)}")
    if report.written:
        err.print(f"{len(report.rows)} lab test(s) from {len(report.pages)} page(s) → {shown(report.written)}")
    if report.failed:
        err.print(f"[bold red]error:[/] {len(report.failed)} of {len(report.pages)} page(s) gave no tests (said above)")
        raise typer.Exit(1)


cache_app = typer.Typer(help="The store's cache: image embeddings and prompt states kept for later questions.",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
@_guard
def cache_info(as_json: Json = False) -> None:
    """How much the cache holds (image embeddings and prompt states, in the model store).

    [bold]Example[/]

      medgemma cache info
    """
    from medgemma_cli.llama.caches import cache_usage

    usage = cache_usage()
    if as_json:
        out.print_json(json.dumps({"entries": usage.entries, "bytes": usage.bytes}))
        return
    out.print(f"{usage.entries} cached entries, {human_bytes(usage.bytes)}")


@cache_app.command("clear")
@_guard
def cache_clear() -> None:
    """Remove every cached image embedding and prompt state (prompt states hold the prompts' text).

    [bold]Example[/]

      medgemma cache clear
    """
    from medgemma_cli.llama.caches import clear_cache

    removed = clear_cache()
    out.print(f"removed {removed.entries} cached entries, {human_bytes(removed.bytes)}")


@app.command()
@_guard
def models(
    as_json: Json = False,
    verify: Annotated[bool, flag(
        "--verify", "Check every file's SHA-256 against its manifest (reads every byte).")] = False,
) -> None:
    """List the converted models in the store (MEDGEMMA_HOME, or the user data folder).

    Sizes are checked whenever a model loads, and SHA-256 sums on the first load after a file changed;
    [bold]--verify[/] checks every sum now. Folders that are not complete models, and files left by killed
    conversions, are listed as warnings.

    [bold]Examples[/]

      medgemma models
      medgemma models --verify
    """
    from medgemma_cli import store

    found = store.list_models()
    problems = store.verify_models(found) if verify else {}

    def warn_and_exit() -> None:
        for problem in problems.values():
            err.print(f"[red]error:[/] {shown(problem)}", soft_wrap=True)
        for path, why in store.damaged_entries():
            err.print(f"[yellow]warning:[/] {shown(path)}: {shown(why)}", soft_wrap=True)
        if problems:
            raise typer.Exit(1)

    if as_json:
        out.print_json(json.dumps([{"name": m.name, "path": str(m.path), "kind": m.kind, "size": m.size,
                                    "preset": m.manifest.get("preset"),
                                    **({"verified": m.name not in problems, "problem": problems.get(m.name)}
                                       if verify else {})} for m in found]))
        warn_and_exit()
        return
    if not found:
        out.print(f"No converted models in {shown(store.models_dir())} yet. "
                  "Convert one with: medgemma convert CHECKPOINT_DIR")
        warn_and_exit()
        return
    from rich.table import Table

    table = Table(title=f"Models in {store.models_dir()}", title_justify="left")
    for col in ("name", "kind", "preset", "size", "source"):
        table.add_column(col)
    if verify:
        table.add_column("verified")
    for m in found:
        row = [m.name, m.kind, str(m.manifest.get("preset")), human_bytes(m.size),
               str(m.manifest.get("source", {}).get("architecture", ""))]
        if verify:
            row.append("[green]ok[/]" if m.name not in problems else "[red]damaged[/]")
        table.add_row(*row)
    out.print(table)
    warn_and_exit()


@app.command()
@_guard
def doctor(
    as_json: Json = False,
    reprobe: Annotated[bool, flag("--reprobe",
        "Test llama.cpp's extra buffer types again (after a driver, BIOS or llama-cpp-python change).")] = False,
) -> None:
    """What this machine will do, and why: CPU and its features, llama.cpp's build, the extra-buffer verdict,
    ONNX Runtime, threads, the model store.

    The first time on a machine (and llama.cpp build) it runs the probe that decides whether llama.cpp's extra
    CPU buffer types (AMX on Intel Xeons, repacked weights) are safe here: a second or two, in a child process.
    MEDGEMMA_EXTRA_BUFFERS=on|off overrides the verdict.

    [bold]Examples[/]

      medgemma doctor
      medgemma doctor --json
      medgemma doctor --reprobe
    """
    from medgemma_cli.doctor import run_doctor

    if as_json:
        out.print_json(json.dumps(run_doctor(reprobe=reprobe).as_dict()))
        return
    with err.status("checking llama.cpp's extra buffer types on this CPU…"):
        r = run_doctor(reprobe=reprobe)
    from rich.table import Table

    t = Table(show_header=False, title="medgemma doctor", title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    cpu = r.cpu
    features = cpu["features"]
    t.add_row("CPU", f"{cpu['model']} · {cpu['architecture']} · {cpu['logical_cores']} logical / "
                     f"{cpu['physical_cores']} physical cores")
    if features:
        t.add_row("CPU features", " ".join(f"[green]{n}[/]" if ok else f"[dim]no {n}[/]" for n, ok in features.items()))
    t.add_row("memory", human_bytes(r.memory_bytes))
    t.add_row("llama.cpp", f"llama-cpp-python {r.llama_cpp['version']} · {' '.join(r.llama_cpp['features'])}")
    t.add_row("GPU offload", "yes" if r.llama_cpp["gpu_offload"] else "no (CPU only)")
    v = r.extra_buffers
    state = "[green]on[/]" if v["enabled"] else "[yellow]off[/]"
    detail = f"{v['reason']}"
    if v.get("probe_seconds") is not None:
        detail += f" · probe took {v['probe_seconds']} s"
    t.add_row("extra buffer types", f"{state} ({v['source']}): {detail}")
    ort = r.onnxruntime
    t.add_row("ONNX Runtime", f"{ort.get('version')} · {', '.join(ort.get('providers') or [])}" if ort.get("version")
              else f"not importable: {ort.get('error')}")
    t.add_row("threads", f"{r.threads} (one per physical core; --threads to change)")
    models = r.store["models"]
    t.add_row("model store", f"{r.store['home']} · "
              + (", ".join(f"{m['name']} ({m['kind']}, {human_bytes(m['bytes'])})" for m in models)
                 or "no models yet"))
    out.print(t)
    if not v["enabled"] and v["source"] != "environment":
        out.print("[yellow]llama.cpp runs without its extra buffer types here: slower prompts, but no crash. "
                  "MEDGEMMA_EXTRA_BUFFERS=on forces them (at your own risk).[/]")


@app.command()
@_guard
def bench(
    shapes: list[str] = typer.Option(
        ["4b"], "--shape",
        help="Synthetic model shapes to run end to end: 4b, 27b, tiny (repeatable); 'none' to skip."),
    preset: str = typer.Option(DEFAULT_PRESET, "--quant", help="Preset of the synthetic models."),
    threads: list[int] | None = typer.Option(
        None, "--threads", "-t", help="Thread counts to measure (repeatable) \\[default: 1 and the physical cores]."),
    prompt_tokens: int = typer.Option(64, "--prompt-tokens", help="Prompt length for prompt processing."),
    decode_tokens: int = typer.Option(16, "--decode-tokens", help="Tokens decoded one at a time."),
    compare_extra_buffers: Annotated[bool, flag(
        "--compare-extra-buffers",
        "Also run each model with llama.cpp's extra buffer types (AMX, repacked weights) off, "
        "where they are safe to have on.")] = False,
    as_json: Json = False,
) -> None:
    """Measure this machine: memory bandwidth, quantized matmuls through ggml, and MedGemma-shaped models end to end.

    The models have random weights of the real shapes, built locally and cached in the store (the 4B
    Q4_K_M model takes 2.5 GB of disk); nothing is downloaded.

    [bold]Examples[/]

      medgemma bench
      medgemma bench --shape 4b --shape 27b --threads 4 --threads 8
      medgemma bench --shape none --json
      medgemma bench --shape tiny --compare-extra-buffers
    """
    from medgemma_cli.bench import run_bench

    chosen = [] if shapes == ["none"] else [s.lower() for s in shapes]
    if as_json:
        report = run_bench(chosen, preset.upper(), threads, prompt_tokens, decode_tokens,
                           compare_extra_buffers=compare_extra_buffers)
        out.print_json(json.dumps(report.as_dict()))
        return
    with err.status("measuring…") as status:
        report = run_bench(chosen, preset.upper(), threads, prompt_tokens, decode_tokens,
                           on_step=lambda s: status.update(s), compare_extra_buffers=compare_extra_buffers)
    from rich.table import Table

    t = Table(title=f"{report.cores} cores ({report.physical_cores} physical), "
                    f"{human_bytes(report.memory_bytes)} memory",
              title_justify="left")
    t.add_column("memory bandwidth")
    t.add_column("GB/s", justify="right")
    for n, bw in report.bandwidth_gbps.items():
        t.add_row(f"{n} thread(s)", f"{bw:.1f}")
    out.print(t)
    t = Table(title="ggml matmul, 2560 → 10240", title_justify="left")
    for col in ("type", "threads", "rows", "ms", "GFLOP/s", "weights GB/s"):
        t.add_column(col, justify="right")
    for f in report.matmul:
        t.add_row(f.type, str(f.threads), str(f.m), f"{f.seconds * 1e3:.2f}", f"{f.gflops:.1f}", f"{f.weight_gbps:.1f}")
    out.print(t)
    if report.end_to_end:
        t = Table(title="End to end (llama.cpp, random weights of the real shape)", title_justify="left")
        for col in ("model", "threads", "extra buffers", "size", "prompt tok/s", "decode tok/s", "bandwidth bound",
                    "ratio"):
            t.add_column(col, justify="right")
        for e in report.end_to_end:
            t.add_row(f"{e.shape} {e.preset}", str(e.threads), "on" if e.extra_buffers else "off",
                      human_bytes(e.model_bytes), f"{e.prompt_tokens_per_s:.1f}", f"{e.decode_tokens_per_s:.2f}",
                      f"{e.bandwidth_bound_tokens_per_s:.2f}", f"{e.ratio_to_bound:.2f}")
        out.print(t)
        v = report.extra_buffers
        out.print(f"[dim]llama.cpp extra buffer types: {'on' if v.get('enabled') else 'off'} "
                  f"({v.get('source')}: {v.get('reason')}); `medgemma doctor` says more[/]")
    rec = report.recommendation
    out.print(f"[bold]Recommendation:[/] preset {rec['preset']}, --threads {rec['threads']}")
    for note in rec["notes"]:
        out.print(f"  • {note}")


@app.command()
@_guard
def demo() -> None:
    """Run the whole pipeline with nothing downloaded, on a tiny random MedGemma.

    The model is generated, converted, and asked about a CT slice that ships with pydicom and a short note.

    [bold]Example[/]

      medgemma demo
    """
    from medgemma_cli.demo import DEMO_QUESTION, RANDOM_WEIGHTS_NOTICE, demo_model, run_demo

    out.print(f"[yellow]{RANDOM_WEIGHTS_NOTICE}[/]")
    demo_model(RichProgress())  # generate and convert first (cached), so the bar does not cut the answer
    out.print(f"[bold]Question:[/] {DEMO_QUESTION}")
    out.print("[bold]Inputs:[/] a CT slice that ships with pydicom (CT_small.dcm) and a short note")
    out.print("[bold]Answer:[/] ", end="")
    result = run_demo(progress=RichProgress(), on_text=lambda s: out.print(s, end="", markup=False))
    out.print()
    out.print(f"[dim]{result.completion_tokens} tokens generated · model: {result.model.path} · "
              f"{result.seconds:.1f} s[/]")
    for p in result.saved_inputs:
        out.print(f"[dim]what the model saw: {shown(p)}[/]")
    out.print(f"[yellow]{RANDOM_WEIGHTS_NOTICE}[/]")


def main() -> None:
    global _DEBUG
    argv = sys.argv[1:]
    if "--debug" in argv or os.environ.get("MEDGEMMA_DEBUG"):
        _DEBUG = True
        argv = [a for a in argv if a != "--debug"]
    app(args=argv, prog_name="medgemma")


if __name__ == "__main__":
    main()
