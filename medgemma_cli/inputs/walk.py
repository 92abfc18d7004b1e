"""One folder walk for every command: which files under a folder are inputs, and why the others are not."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medgemma_cli.errors import InputError
from medgemma_cli.inputs import dicom
from medgemma_cli.inputs.images import is_image
from medgemma_cli.inputs.notes import NOTE_SUFFIXES
from medgemma_cli.inputs.slides import is_slide_file
from medgemma_cli.printable import printable

MODEL_INPUTS = frozenset({"dicom", "image", "slide", "note"})  # what `ask` and `chat` read
IMAGE_INPUTS = frozenset({"dicom", "image", "slide"})  # what a batch unit is made of

_NAMES = {"dicom": "DICOM", "image": "a PNG/JPEG image", "slide": "a whole slide",
          "note": "a text/PDF note"}


def kind_of(path: Path) -> str | None:
    """"dicom", "image", "slide" or "note", from the file's first bytes (DICOM, images) or its suffix (vendor
    slides, notes). DICOM whole-slide images are "dicom": their series is one slide."""
    if dicom.is_dicom(path):
        return "dicom"
    if is_image(path):
        return "image"
    if is_slide_file(path):
        return "slide"
    if path.suffix.lower() in NOTE_SUFFIXES:
        return "note"
    return None


def _kind_names(kinds: frozenset[str]) -> str:
    names = [_NAMES[k] for k in ("dicom", "image", "slide", "note") if k in kinds]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


@dataclass
class Walk:
    files: list[Path]
    skipped: list[tuple[str, str]]  # (relative path, why)


def walk(folder: Path, kinds: frozenset[str] = MODEL_INPUTS, ours: set[Path] | None = None) -> Walk:
    """Every file of the given kinds under `folder`, following links once. What is left out (loops, unreadable
    entries, DICOMDIR, empty files, other kinds) is listed with the reason; `ours` (files and folders this tool
    writes) are left out without a word."""
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
        elif kind_of(f) in kinds:
            kept.append(f)
        else:
            skipped.append((name, f"not {_kind_names(kinds)}"))
    return Walk(kept, skipped)
