"""Terminal output with rich: progress bars, tables, one-line errors."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress as RichBar,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from medgemma_cli.printable import printable

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def shown(text: object) -> str:
    """Text from files or the user (paths, DICOM strings, warnings about them) inside a rich markup line:
    `[red]` in a file name is not markup, and an escape sequence in a header does not reach the terminal."""
    return escape(printable(text))


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class RichProgress:
    """Bytes and tensors written, speed and ETA; a spinner line for steps with no byte count."""

    def __init__(self, console: Console = err):
        self._bar = RichBar(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
            DownloadColumn(), TransferSpeedColumn(), TextColumn("{task.fields[tensors]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
        )
        self._task: TaskID | None = None
        self._tensors = 0
        self._total_tensors = 0

    def begin(self, label: str, total_bytes: int, total_tensors: int) -> None:
        self._bar.start()
        self._tensors, self._total_tensors = 0, total_tensors
        self._task = self._bar.add_task(label, total=total_bytes, tensors=f"0/{total_tensors} tensors")

    def advance(self, nbytes: int, tensors: int = 0) -> None:
        if self._task is None:
            return
        self._tensors += tensors
        self._bar.update(self._task, advance=nbytes, tensors=f"{self._tensors}/{self._total_tensors} tensors")

    def status(self, message: str) -> None:
        if self._task is not None:
            self._bar.update(self._task, description=message)

    def end(self) -> None:
        self._bar.stop()
        self._task = None
