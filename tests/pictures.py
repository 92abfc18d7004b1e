"""Test images that are not blank (a blank image is refused, as it should be)."""

from __future__ import annotations

import numpy as np


def picture(h: int, w: int, level: int) -> np.ndarray:
    """An h×w RGB image around `level` with a ramp across it; different levels give different images."""
    return (np.full((h, w, 3), level, np.uint8) + np.arange(w, dtype=np.uint8)[None, :, None]).astype(np.uint8)
