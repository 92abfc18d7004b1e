"""A unit made ready for the model (read, rendered, scored by MedSigLIP) while the model answers the one before."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from medgemma_cli.batch.units import Unit
from medgemma_cli.inputs.collect import Collected

if TYPE_CHECKING:
    from medgemma_cli.siglip import ZeroShot


@dataclass
class Prepared:
    unit: Unit
    inputs: Collected | None
    error: str | None
    image_uris: list[str] = field(default_factory=list)


def prefetch(units: list[Unit], prepare: Callable[[Unit], Prepared], depth: int = 1) -> Iterator[Prepared]:
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


def classification(zero_shot: ZeroShot, inputs: Collected) -> dict[str, Any]:
    """Over the slices the model saw, before resizing (MedSigLIP pads to a square rather than stretching):
    the mean and the max, so a series reads as 'how much, and where most'."""
    images = [img.full if img.full is not None else img.rgb for img in inputs.images]
    p = zero_shot.probabilities(images)
    for img in inputs.images:
        img.full = None  # only MedSigLIP needed it; the unit may wait a while for the server
    return {"images": len(images),
            "mean": {lb: round(float(v), 4) for lb, v in zip(zero_shot.labels, p.mean(axis=0), strict=True)},
            "max": {lb: round(float(v), 4) for lb, v in zip(zero_shot.labels, p.max(axis=0), strict=True)}}
