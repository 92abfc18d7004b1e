"""PNG/JPEG → RGB, and the square resize the Hugging Face Gemma 3 processor applies (PIL bilinear, no
letterbox), done by us so that llama.cpp's aspect-preserving letterbox never applies."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np

from medgemma_cli.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def is_image(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"))


def load_rgb(path: Path) -> np.ndarray:
    """An image file as H×W×3 uint8: grey replicated, alpha dropped, 16-bit scaled by the dtype maximum."""
    from PIL import Image, UnidentifiedImageError

    from medgemma_cli.inputs.limits import check_image_size, limit, raise_hint

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit below says it better
            with open_unguarded(path) as im:  # the header only: the size is known before anything is decoded
                w, h = im.size
                if im.format == "JPEG" and w * h > limit("image_pixels"):
                    im.draft("RGB", (w // 8 + 1, h // 8 + 1))  # libjpeg decodes at 1/2, 1/4 or 1/8 scale, free
                    w, h = im.size
                check_image_size(path, w, h)
                im.load()
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    a = np.asarray(im).astype(np.float64)
                    peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
                    g = np.clip(np.round(a / peak * 255.0), 0, 255).astype(np.uint8)
                    return np.repeat(g[..., None], 3, axis=-1)
                return np.asarray(im.convert("RGB"))
    except Image.DecompressionBombError as e:
        raise InputError(path, f"is over the limit of {limit('image_pixels'):,} pixels ({e}; "
                               f"{raise_hint('image_pixels')})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(path, f"not a readable image ({e})") from e


_pil_guard = threading.Lock()


def open_unguarded(path: Path | BinaryIO):  # -> a PIL image
    """Image.open without PIL's own pixel guard, which refuses at open what our check handles before decoding
    (a huge JPEG can still be read at 1/8 scale); the guard is put back at once."""
    from PIL import Image

    with _pil_guard:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Stretch to size×size with PIL's bilinear filter, exactly as Gemma3ImageProcessor does."""
    from PIL import Image

    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb, "RGB").resize((size, size), Image.Resampling.BILINEAR))


def square_padding(height: int, width: int) -> tuple[int, int, int]:
    """(side, top, left) of the centred zero padding to a square: the odd pixel, if any, goes below/right."""
    side = max(height, width)
    return side, (side - height) // 2, (side - width) // 2


def pad_to_square(rgb: np.ndarray) -> np.ndarray:
    """The image centred on a black square of side max(h, w), in its own dtype (uint8 stays uint8: Google's
    localization notebook pads as here, but its `* 255` after the pad would wrap uint8 input round)."""
    h, w = rgb.shape[:2]
    side, top, left = square_padding(h, w)
    out = np.zeros((side, side, *rgb.shape[2:]), rgb.dtype)
    out[top:top + h, left:left + w] = rgb
    return out


def save_png(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(rgb, "RGB").save(path, format="PNG")
