"""How long a prompt will take on this machine, said before the work starts.

Speeds are what this machine measured on earlier runs of the same model files with the same encoder and thread
count (image encoding per image, prompt reading per token), remembered in the store and updated after every
run; a machine that has not run the model yet gets no estimate before its first image (the progress bar's
remaining time appears from the first image on). Images whose embeddings are cached cost nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

_WEIGHT_NEW = 0.5  # how much a new measurement moves the remembered speed
FEWER_SLICES = 24  # what a long wait suggests instead of the recipe's 85: the volume still sampled through


@dataclass(frozen=True)
class Speeds:
    encode_s_per_image: float
    prompt_tokens_per_s: float


@dataclass(frozen=True)
class Estimate:
    images: int  # to encode (cached ones left out)
    images_s: float
    reading_s: float
    slices: int = 0  # of the largest volume, for the suggestion below
    fewer_slices: int = 0  # a smaller --max-slices worth suggesting, and what it would take
    fewer_slices_s: float = 0.0
    sent: int = 0  # images in the prompt (cached ones included), for the wording

    @property
    def total_s(self) -> float:
        return self.images_s + self.reading_s

    def line(self) -> str:
        n = self.sent or self.images
        what = f"{self.slices} slices" if self.slices else f"{n} image{'s' * (n != 1)}"
        text = (f"{what}: about {duration(self.total_s)} on this machine (images {duration(self.images_s)}, "
                f"reading {duration(self.reading_s)})")
        if self.fewer_slices:
            text += f"; --max-slices {self.fewer_slices} takes about {duration(self.fewer_slices_s)}"
        return text

    def as_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "total_s": round(self.total_s, 1)}


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def speeds_key(text: Path, vision: Path | None, backend: str, threads: int) -> str:
    """The files (by name and size: no hashing before the estimate), the encoder and the threads."""
    parts = [f"{Path(text).name}:{Path(text).stat().st_size}", backend, f"t{threads}"]
    if vision is not None:
        parts.insert(1, f"{Path(vision).name}:{Path(vision).stat().st_size}")
    return "|".join(parts)


def _speeds_file() -> Path:
    from medgemma_cli import store

    return store.cache_dir() / "speeds.json"


def _read() -> dict[str, dict[str, float]]:
    try:
        known = json.loads(_speeds_file().read_text(encoding="utf-8"))
        return known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        return {}


def known_speeds(key: str) -> Speeds | None:
    entry = _read().get(key)
    try:
        speeds = Speeds(float(entry["encode_s_per_image"]), float(entry["prompt_tokens_per_s"]))  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return None
    return speeds if speeds.encode_s_per_image >= 0 and speeds.prompt_tokens_per_s > 0 else None


def remember(key: str, images: int, encode_s: float, prompt_tokens: int, reading_s: float) -> None:
    """Fold one run's measurements into this machine's speeds (runs too small to measure change nothing)."""
    from medgemma_cli.atomic import replace_text

    known = _read()
    old = known.get(key) if isinstance(known.get(key), dict) else None
    new: dict[str, float] = dict(old or {})
    if images and encode_s > 0:
        new["encode_s_per_image"] = _blend(old, "encode_s_per_image", encode_s / images)
    if prompt_tokens >= 64 and reading_s > 0:
        new["prompt_tokens_per_s"] = _blend(old, "prompt_tokens_per_s", prompt_tokens / reading_s)
    if new == (old or {}):
        return
    known[key] = new
    try:
        _speeds_file().parent.mkdir(parents=True, exist_ok=True)
        replace_text(_speeds_file(), json.dumps(known, indent=1))
    except OSError:
        pass  # a read-only store: no estimate next time, nothing else lost


def _blend(old: dict[str, float] | None, name: str, value: float) -> float:
    try:
        return (1 - _WEIGHT_NEW) * float(old[name]) + _WEIGHT_NEW * value  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return value


def estimate(speeds: Speeds, images: int, prompt_tokens: int, image_tokens: int, slices: int = 0,
             sent: int = 0) -> Estimate:
    """The wait for `images` to encode and `prompt_tokens` to read; for a volume of `slices`, also what
    FEWER_SLICES of them would take (worth saying only when the wait is long)."""
    images_s = images * speeds.encode_s_per_image
    reading_s = prompt_tokens / speeds.prompt_tokens_per_s
    fewer, fewer_s = 0, 0.0
    if slices > FEWER_SLICES and images_s + reading_s > 5 * 60:
        fewer = FEWER_SLICES
        saved = slices - fewer
        fewer_s = max(0.0, images_s + reading_s - saved * (speeds.encode_s_per_image
                                                           + image_tokens / speeds.prompt_tokens_per_s))
    return Estimate(images, images_s, reading_s, slices, fewer, fewer_s, sent)
