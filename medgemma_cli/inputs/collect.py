"""Files and folders given on the command line → the images, labels and notes of one prompt."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_cli.checksums import sha256_file
from medgemma_cli.defaults import DEFAULT_MAGNIFICATION, MAX_PAGES, MAX_PATCHES
from medgemma_cli.errors import InputError
from medgemma_cli.inputs import dicom, documents, identifiers, slides as wsi
from medgemma_cli.inputs.images import load_rgb, pad_to_square, resize_square
from medgemma_cli.inputs.notes import pdf_text, read_note
from medgemma_cli.inputs.walk import MODEL_INPUTS, kind_of, walk
from medgemma_cli.printable import printable


@dataclass
class PromptImage:
    rgb: np.ndarray  # already at the model's square input size
    label: str | None  # "SLICE n" for slices of a volume
    source: Path
    full: np.ndarray | None = None  # the rendering before resizing, kept only on request (MedSigLIP pads instead)
    heading: str | None = None  # text put before this image ("Prior study:" with --label-timepoints)


@dataclass
class InputRecord:
    path: Path
    kind: str  # dicom | image | note | dicom-sr | slide | document (a PDF's pages) | dicom-pdf
    detail: str  # what was made of it

    @functools.cached_property
    def sha256(self) -> str:
        """Computed when first asked for (ask's JSON, chat transcripts); a batch never pays for it."""
        return sha256_file(self.path)


@dataclass
class Collected:
    images: list[PromptImage] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (file name, text)
    records: list[InputRecord] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    volumes: list[dicom.Volume] = field(default_factory=list)
    identifiers_removed: int = 0  # patient identifiers (from the study's headers) replaced in notes and SR text
    slides: list[SlideInput] = field(default_factory=list)


@dataclass
class SlideInput:
    """One whole slide: the plan its patches came from and a small overview with them outlined (batch reports)."""
    plan: wsi.SlidePlan
    overview: np.ndarray


def expand(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Files named directly, plus the inputs under named folders (the walk `batch` uses; what it leaves out is
    said in the warnings)."""
    files: list[Path] = []
    warnings: list[str] = []
    for p in paths:
        if p.is_dir():
            found = walk(p, MODEL_INPUTS)
            files.extend(found.files)
            warnings.extend(f"skipped {name}: {why}" for name, why in found.skipped)
        elif p.is_file():
            files.append(p)
        elif p.exists():
            raise InputError(p, "not a regular file or folder")
        else:
            raise InputError(p, "no such file or folder")
    return files, warnings


def collect(paths: list[Path], image_size: int | None, max_slices: int = dicom.MAX_SLICES,
            keep_full: bool = False, scrub_identifiers: bool = True, note_bytes: int | None = None,
            pad_square: bool = False, *, magnification: str = DEFAULT_MAGNIFICATION, max_patches: int = MAX_PATCHES,
            max_pages: int = MAX_PAGES) -> Collected:
    """Read and render everything; DICOM images are grouped into series and rendered by modality; whole slides
    (DICOM WSI series, vendor files) give at most `max_patches` tissue patches in all (see `slides`). PDFs (and
    DICOM Encapsulated PDF) give their text layer as a note and, for a model that reads images, their first
    `max_pages` pages as images (see `documents`).

    `note_bytes` bounds what is read of each note (the context it will go into holds only so much).

    With `scrub_identifiers` (the default), the patient's identifiers named in the DICOM headers are replaced by
    placeholders in the notes and structured-report text (see `identifiers`).

    With `pad_square`, each image is zero-padded to a centred square before the resize (the localization
    recipe's preprocessing: box coordinates then refer to that square); the unpadded rendering is kept in
    `full`, for mapping coordinates back and drawing."""
    keep_full = keep_full or pad_square

    def square(rgb: np.ndarray) -> np.ndarray:
        assert image_size is not None
        return resize_square(pad_to_square(rgb) if pad_square else rgb, image_size)

    files, warnings = expand([Path(p) for p in paths])
    named = {Path(p) for p in paths}
    out = Collected(warnings=warnings)
    dicoms: list[tuple[Path, Any]] = []
    headers: list[Any] = []
    slide_series: dict[str, list[tuple[Path, Any]]] = {}  # DICOM WSI instances by series: one slide each
    vendor_slides: list[Path] = []
    for f in files:
        kind = kind_of(f)
        if kind is None:
            if f in named:
                raise InputError(f, "not a DICOM file (no DICM preamble), PNG/JPEG image, slide or text/PDF note")
            out.warnings.append(f"skipped {printable(f)}: not DICOM, an image or a note")
            continue
        if kind == "note" and f.suffix.lower() == ".pdf" and image_size is not None:
            _add_document(out, f, None, image_size, max_pages, note_bytes, keep_full)
        elif kind == "note":
            note = read_note(f, note_bytes)
            out.notes.append((f.name, note.text))
            out.warnings.extend(f"{printable(f.name)}: {w}" for w in note.warnings)
            out.records.append(InputRecord(f, "note", f"note, {len(note.text)} characters{note.how}"))
        elif kind == "image":
            if image_size is None:
                raise InputError(f, "this model has no vision projector (mmproj); it cannot read images")
            rgb = load_rgb(f)
            if dicom.is_flat(rgb):
                raise InputError(f, "the image is blank: every pixel has the same value")
            out.images.append(PromptImage(square(rgb), None, f, rgb if keep_full else None))
            out.records.append(InputRecord(f, "image", f"{rgb.shape[1]}×{rgb.shape[0]} image"))
        elif kind == "slide":
            vendor_slides.append(f)
        elif wsi.is_wsi_file(f):  # the header only: a slide's pixel data is read tile by tile, later
            ds = dicom.read(f, pixels=False)
            headers.append(ds)
            slide_series.setdefault(str(ds.get("SeriesInstanceUID", "") or f), []).append((f, ds))
        else:
            ds = dicom.read(f)
            headers.append(ds)
            if dicom.is_sr(ds):
                with dicom.reading(f):
                    text = dicom.sr_text(ds)
                if not text:
                    raise InputError(f, "structured report without text content")
                out.notes.append((f.name, text))
                out.records.append(InputRecord(f, "dicom-sr", f"structured report, {len(text)} characters"))
            elif documents.is_encapsulated_pdf(ds):
                data = documents.encapsulated_pdf(ds, f)
                if image_size is None:
                    text = pdf_text(f, data, note_bytes)
                    if not text:
                        raise InputError(f, "the encapsulated PDF has no text layer, and this model reads no images")
                    out.notes.append((f.name, text))
                    out.records.append(InputRecord(f, "dicom-pdf", f"encapsulated PDF, {len(text)} characters"))
                else:
                    _add_document(out, f, data, image_size, max_pages, note_bytes, keep_full)
            elif "PixelData" not in ds:
                sop = getattr(ds.get("SOPClassUID"), "name", None) or str(ds.get("SOPClassUID", "unknown"))
                raise InputError(f, f"{sop} object has no image or text for the model")
            else:
                dicoms.append((f, ds))
    if slide_series or vendor_slides:
        if image_size is None:
            first = vendor_slides[0] if vendor_slides else next(iter(slide_series.values()))[0][0]
            raise InputError(first, "this model has no vision projector (mmproj); it cannot read images")
        _add_slides(out, list(slide_series.values()), vendor_slides, image_size, keep_full, magnification,
                    max_patches)
    if dicoms:
        if image_size is None:
            raise InputError(dicoms[0][0], "this model has no vision projector (mmproj); it cannot read images")
        for vol in dicom.assemble(dicoms, max_slices):
            rendered = dicom.render_volume(vol)  # may leave out slices that cannot be shown (vol.notes says so)
            out.warnings.extend(printable(n) for n in vol.notes)
            for i, (s, rgb) in enumerate(zip(vol.slices, rendered, strict=True), 1):
                label = f"SLICE {i}" if vol.is_volume else None
                out.images.append(PromptImage(square(rgb), label, s.path, rgb if keep_full else None))
            out.volumes.append(vol)
            out.metadata.append(vol.metadata)
            how = {"CT": "CT, HU in 3 windows (R −1024..1024, G −135..215, B 0..80)",
                   "MR": "MR, min–max over the volume" if vol.is_volume else "MR, min–max"}.get(
                       vol.modality, f"{vol.modality or 'image'}, LUTs applied")
            sent = len(vol.slices)
            detail = f"{how}; {sent} of {vol.total_slices} slices" if vol.is_volume else how
            files_in = sorted({s.path for s in vol.slices})
            for p in files_in:
                out.records.append(InputRecord(p, "dicom", detail))
            if vol.total_slices > sent:
                out.warnings.append(f"the series of {printable(files_in[0].name)}: {vol.total_slices} slices, "
                                    f"{sent} sampled evenly")
    if scrub_identifiers and out.notes and headers:
        _scrub_notes(out, headers)
    return out


def combine_studies(prior: Collected, current: Collected, label_timepoints: bool = False) -> Collected:
    """One prompt's inputs for a comparison: the prior study's first, then the current one's, as Google's
    longitudinal notebook sends them (no text between the images unless `label_timepoints`)."""
    from medgemma_cli.recipes import template

    if not prior.images or not current.images:
        raise InputError(None, "a comparison needs images in both the prior and the current study")
    if label_timepoints:
        prior.images[0].heading = template("prior-label").strip()
        current.images[0].heading = template("current-label").strip()
    return Collected(images=prior.images + current.images, notes=prior.notes + current.notes,
                     records=prior.records + current.records, metadata=prior.metadata + current.metadata,
                     warnings=prior.warnings + current.warnings, volumes=prior.volumes + current.volumes,
                     identifiers_removed=prior.identifiers_removed + current.identifiers_removed,
                     slides=prior.slides + current.slides)


def _add_document(out: Collected, path: Path, data: bytes | None, image_size: int, max_pages: int,
                  note_bytes: int | None, keep_full: bool) -> None:
    """A PDF (a file, or `data` from a DICOM object): its text layer as a note, its pages as images."""
    text = pdf_text(path, data, note_bytes)
    pages, notes = documents.render_pages(data if data is not None else path, path, image_size, max_pages)
    if not pages and not text:
        raise InputError(path, "the PDF has no text layer and no page that could be rendered")
    if text:
        out.notes.append((path.name, text))
    for rgb in pages:
        out.images.append(PromptImage(rgb, None, path, rgb if keep_full else None))
    out.warnings.extend(f"{printable(path.name)}: {n}" for n in notes)
    what = "encapsulated PDF" if data is not None else "PDF"
    layer = f"text layer {len(text)} characters" if text else "no text layer"
    out.records.append(InputRecord(path, "dicom-pdf" if data is not None else "document",
                                   f"{what}, {len(pages)} page(s) as {image_size} px images (fit, zero-padded "
                                   f"square); {layer}"))


def _add_slides(out: Collected, series: list[list[tuple[Path, Any]]], vendor: list[Path], image_size: int,
                keep_full: bool, magnification: str, max_patches: int) -> None:
    """Each slide planned (level, tissue cells) first, then the patch budget shared over the slides, then the
    chosen patches read one by one."""
    readers: list[wsi.SlideReader] = []
    try:
        for instances in series:
            readers.append(wsi.DicomSlideReader(instances))
        for f in vendor:
            readers.append(wsi.OpenSlideReader(f))
        plans = []
        for r in readers:
            try:
                plans.append(wsi.plan(r, magnification, max_patches))
            except InputError as e:
                raise InputError(r.path, e.problem.removeprefix(f"{r.name}: ")) from None
        shares = dicom.share_slices([len(p.cells) for p in plans], max_patches)
        for r, p, share, files in zip(readers, plans, shares, [[f for f, _ in s] for s in series] +
                                      [[f] for f in vendor], strict=True):
            wsi.limit_patches(p, share)
            out.warnings.extend(printable(n) for n in p.notes)
            for rgb in wsi.patches(r, p):
                out.images.append(PromptImage(resize_square(rgb, image_size), None, files[0],
                                              rgb if keep_full else None))
            out.slides.append(SlideInput(p, wsi.overview(r, p)))
            for f in files:
                out.records.append(InputRecord(f, "slide", p.describe()))
    finally:
        for r in readers:
            r.close()


def _scrub_notes(out: Collected, headers: list[Any]) -> None:
    known = identifiers.from_datasets(headers)
    if not known:
        return
    scrubbed = []
    for name, text in out.notes:
        shown_name, n_name = known.scrub(name.replace("_", " "))
        text, n = known.scrub(text)
        out.identifiers_removed += n + n_name
        scrubbed.append((shown_name if n_name else name, text))
    out.notes = scrubbed
