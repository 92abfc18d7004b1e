"""Terminal output with rich: progress bars, tables, one-line errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from medgemma_cli.estimate import Estimate

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


class PromptProgress:
    """`ask` and `chat` on stderr while the prompt is read: a spinner, then this machine's estimate, a bar per
    image encoded (with the time left), a spinner while the text is read; all of it gone when the answer starts."""

    def __init__(self, console: Console = err):
        self.console = console
        self._status = console.status("reading the inputs…")
        self._bar: RichBar | None = None
        self._task: TaskID | None = None
        self._status.start()

    def planned(self, estimate: Estimate | None, images: int) -> None:
        """A bar for the images to encode (the estimate itself is said through AskOptions.on_wait)."""
        if images:
            self._status.stop()
            self._bar = RichBar(SpinnerColumn(), TextColumn("encoding images"), BarColumn(), TextColumn(
                "{task.completed}/{task.total}"), TimeElapsedColumn(), TimeRemainingColumn(), console=self.console,
                transient=True)
            self._bar.start()
            self._task = self._bar.add_task("images", total=images)
        else:
            self._status.update("reading the prompt…")

    def image(self, done: int, total: int) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, completed=done)
            if done >= total:
                self._bar.stop()
                self._bar = None
                self._status.update("reading the prompt…")
                self._status.start()

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        self._status.stop()
