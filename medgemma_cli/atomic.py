"""Outputs that appear whole or not at all."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from medgemma_cli.errors import OutputError
from medgemma_cli.store import MANIFEST, VERIFIED, leftovers


class AtomicFolder:
    """Write files under temporary names inside `folder`, rename them into place only on success.

    The temporaries live in the destination folder (same filesystem, so the rename is atomic); on any
    failure — an exception, Ctrl-C — they are removed, and so is the folder if we created it.
    """

    def __init__(self, folder: Path, final_names: list[str], *, overwrite: bool = False):
        self.folder = Path(folder)
        self.final_names = list(final_names)
        self.overwrite = overwrite
        self._created: list[Path] = []
        self._temps: dict[str, Path] = {}
        self._scratch: list[Path] = []

    def __enter__(self) -> AtomicFolder:
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(self.folder, "exists and is not a folder")
        stale = leftovers(self.folder) if self.folder.is_dir() else []  # temporaries of conversions that were killed
        # outputs without a manifest, beside a killed conversion's temporaries, are that conversion's: not a model
        unfinished = bool(stale) and MANIFEST in self.final_names and not (self.folder / MANIFEST).exists()
        for path in stale:
            try:
                path.unlink()
            except OSError:
                pass
        if not self.overwrite and not unfinished:
            for name in self.final_names:
                if (self.folder / name).exists():
                    raise OutputError(self.folder / name, "already exists (use --force to replace it)")
        missing = []
        p = self.folder
        while not p.exists():
            missing.append(p)
            p = p.parent
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(self.folder, f"cannot create folder: {e.strerror or e}") from e
        self._created = list(reversed(missing))
        return self

    def temp(self, name: str) -> Path:
        """The temporary path that becomes `name` on success."""
        path = self.folder / f".{name}.partial-{os.getpid()}"
        self._temps[name] = path
        return path

    def scratch(self, name: str) -> Path:
        """A temporary file that is removed whatever happens."""
        path = self.folder / f".{name}.scratch-{os.getpid()}"
        self._scratch.append(path)
        return path

    def also_remove(self, path: Path) -> Path:
        """Register another temporary file (named by a library, say) to be removed whatever happens."""
        self._scratch.append(Path(path))
        return Path(path)

    def _cleanup(self, paths: list[Path]) -> None:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._cleanup(self._scratch)
        if exc_type is None:
            # the manifest is the commit point: the old one goes first and the new one comes last, so a kill
            # between the renames leaves a folder that is not a model, never a model made of two conversions
            names = sorted(self.final_names, key=lambda n: n == MANIFEST)
            if MANIFEST in self._temps:
                (self.folder / MANIFEST).unlink(missing_ok=True)
            for name in names:
                if name in self._temps and self._temps[name].exists():  # optional outputs may not exist
                    os.replace(self._temps[name], self.folder / name)
            (self.folder / VERIFIED).unlink(missing_ok=True)  # checksums of the old files no longer apply
            return
        self._cleanup(list(self._temps.values()))
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:
                break


@contextmanager
def replacing(path: Path, *, mode: int = 0o644, sync: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` (`.NAME.partial-PID`, created with `mode`) to write however the caller
    likes: when the block ends it replaces `path` in one rename (after an fsync if `sync`), and when the block
    fails it is removed. A single file is then whole or absent, like an AtomicFolder's."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode))
    try:
        yield tmp
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def replace_text(path: Path, text: str, mode: int = 0o644, sync: bool = False) -> None:
    """Write a small text file whole or not at all."""
    with replacing(path, mode=mode, sync=sync) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)


@contextmanager
def write_errors(target: Path) -> Iterator[None]:
    """Report a failing write (full disk, permissions) as one line about `target`."""
    try:
        yield
    except OSError as e:
        why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise OutputError(target, f"writing failed: {why}") from e


def check_writable(path: Path) -> None:
    """Refuse, before any work, an output file that could not be written when the work is done: `path` a folder,
    or its folder not writable (tried by creating and removing a file there). A missing folder is fine where its
    nearest existing parent is writable: it is created when the file is written, as batch and embed create theirs,
    so a run that fails leaves no empty folder behind."""
    import tempfile

    path = Path(path)
    if path.is_dir():
        raise OutputError(path, "is a folder; name the file to write")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(path, f"cannot create its folder: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=folder)
    except OSError as e:
        raise OutputError(path, f"cannot write in {folder}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)
