"""DICOM → what MedGemma sees.

2-D images: modality LUT, VOI (window or LUT), MONOCHROME1 inverted, colour spaces to RGB. CT: Hounsfield
units packed into three windows (R −1024..1024, G −135..215, B 0..80 HU). MR: min–max over the whole
volume, grey. Series are grouped by SeriesInstanceUID and ordered along the slice normal; multi-frame
objects are volumes too. Decoding goes through pydicom's pixel backends (pylibjpeg plugins for JPEG,
JPEG-LS, JPEG 2000, RLE).
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgemma_cli.defaults import MAX_SLICES
from medgemma_cli.errors import InputError
from medgemma_cli.offline import import_pydicom
from medgemma_cli.printable import printable

if TYPE_CHECKING:
    from pydicom import Dataset

CT_WINDOWS = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))  # HU ranges packed into R, G, B
SAFE_TAGS = ("Modality", "BodyPartExamined", "ViewPosition", "PatientAge", "PatientSex")
SR_SKIP_VALUE_TYPES = {"PNAME", "DATE", "DATETIME", "TIME", "UIDREF"}  # identifying or not clinical content


def is_dicom(path: Path) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble, whatever their name."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


class _CappedReads(io.BufferedReader):
    """pydicom reads an element's declared length in one call, and a 40 KB file may declare 4 GB: reads are
    capped at what the file holds, so a lying length is a short read (an error), not an allocation."""

    def __init__(self, raw: io.FileIO, size: int):
        super().__init__(raw)
        self._size = size
        self.overrun: tuple[int, int] | None = None  # (asked, left) of the first read past the end

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            left = max(0, self._size - self.tell())
            if size > left + 8 and self.overrun is None:  # (a tag's 8 bytes: pydicom probing for the end)
                self.overrun = (size, left)
            size = min(size, left)
            if size == 0:
                return b""
        return super().read(size)


def read(path: Path, *, pixels: bool = True) -> Any:
    """A DICOM file with every header value already converted: pydicom converts on first access, so a hostile
    value would otherwise fail later, far from the file; here it fails naming the file and the element."""
    pydicom = import_pydicom()

    try:
        raw = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the reader around it
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    element = None
    try:
        with _CappedReads(raw, os.fstat(raw.fileno()).st_size) as f:
            ds = pydicom.dcmread(f, stop_before_pixels=not pixels)
            for element in _convert_all(ds.file_meta):  # noqa: B007 - named in the error if it fails
                pass
            for element in _convert_all(ds):  # noqa: B007 - named in the error if it fails
                pass
            if f.overrun is not None:
                element = None
                asked, left = f.overrun
                raise InputError(path, f"an element declares {asked:,} bytes, but {left:,} are left in the file "
                                       "(cut short or damaged)")
    except InputError:
        raise
    except (MemoryError, RecursionError) as e:
        raise InputError(path, f"not a readable DICOM file ({type(e).__name__}: nested or sized beyond reason)"
                         ) from None
    except Exception as e:  # noqa: BLE001 - whatever pydicom raises on this file's bytes is this file's problem
        where = f" in element {element}" if element is not None else ""
        raise InputError(path, f"not a readable DICOM file{where} ({type(e).__name__}: {e})") from None
    return ds


def _convert_all(ds: Dataset) -> Iterator[Any]:
    """Yields each tag before converting its element (so a failure can name it), sequences included."""
    for tag in list(ds.keys()):
        yield tag
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value or ():
                yield from _convert_all(item)


class HeaderValueError(ValueError):
    """A header value that is there but unusable (not a number, not finite, the wrong count)."""

    def __init__(self, keyword: str, value: Any, why: str = "is not a usable number"):
        super().__init__(f"{keyword} {_shown(value)} {why}")


def _values(value: Any) -> list[Any]:
    """A header value as the list of its values (pydicom gives a MultiValue for several, the value for one)."""
    from pydicom.multival import MultiValue

    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _shown(value: Any) -> str:
    return repr("\\".join(str(v) for v in _values(value))[:40])


def numbers(item: Dataset, keyword: str, count: int | None = None) -> list[float] | None:
    """A numeric header value as finite floats; None when absent or empty; HeaderValueError when unusable."""
    value = item.get(keyword)
    if value is None or value == "":
        return None
    try:
        out = [float(v) for v in _values(value)]
    except (TypeError, ValueError, OverflowError):
        raise HeaderValueError(keyword, value) from None
    if not out or (count is not None and len(out) != count):
        raise HeaderValueError(keyword, value, f"has {len(out)} values, not {count}")
    if not all(math.isfinite(v) for v in out):
        raise HeaderValueError(keyword, value, "is not finite")
    return out


def number(item: Dataset, keyword: str, default: float | None = None) -> float | None:
    """One numeric header value (the first, where DICOM allows several, as for windows)."""
    values = numbers(item, keyword)
    return default if values is None else values[0]


def integer(item: Dataset, keyword: str) -> int | None:
    value = number(item, keyword)
    if value is None:
        return None
    if value != int(value):
        raise HeaderValueError(keyword, item.get(keyword), "is not a whole number")
    return int(value)


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turns what a hostile header or pixel stream makes numpy or pydicom raise into an error naming the file."""
    try:
        yield
    except InputError:
        raise
    except MemoryError:
        raise InputError(path, "ran out of memory rendering this image (lower MEDGEMMA_MAX_IMAGE_PIXELS)") from None
    except (ValueError, TypeError, ArithmeticError, LookupError, AttributeError, NotImplementedError,
            struct.error) as e:
        raise InputError(path, f"cannot render: {e}" if isinstance(e, HeaderValueError) else
                         f"cannot render ({type(e).__name__}: {e})") from None


def safe_metadata(ds: Dataset) -> dict[str, str]:
    """Only non-identifying fields: modality, body part, view, age, sex. Never names, IDs or dates."""
    out = {}
    for tag in SAFE_TAGS:
        value = ds.get(tag)
        if value not in (None, ""):
            out[tag] = str(value)
    return out


def sr_text(ds: Dataset) -> str:
    """The text content of a Structured Report: concept names and values, identifying items left out.
    Every item is optional here: a report missing a code meaning or a unit still reads as far as it goes."""
    lines: list[str] = []

    def first_of(item: Dataset, keyword: str) -> Any:
        seq = item.get(keyword)
        return seq[0] if seq else None

    def meaning(code: Any) -> str:
        return str(code.get("CodeMeaning", "") or "") if code is not None else ""

    def walk(items: Iterable[Any], depth: int) -> None:
        for item in items:
            vt = str(item.get("ValueType", "") or "")
            if vt in SR_SKIP_VALUE_TYPES:
                continue
            name = meaning(first_of(item, "ConceptNameCodeSequence"))
            value = ""
            if vt == "TEXT":
                value = str(item.get("TextValue", "") or "")
            elif vt == "CODE":
                value = meaning(first_of(item, "ConceptCodeSequence"))
            elif vt == "NUM" and (mv := first_of(item, "MeasuredValueSequence")) is not None:
                units = first_of(mv, "MeasurementUnitsCodeSequence")
                unit = str(units.get("CodeValue", "") or "") if units is not None else ""
                value = f"{mv.get('NumericValue', '')} {unit}".strip()
            if name or value:
                lines.append("  " * depth + (f"{name}: {value}" if name and value else name or value))
            if item.get("ContentSequence"):
                walk(item.ContentSequence, depth + 1)

    title = meaning(first_of(ds, "ConceptNameCodeSequence"))
    if title:
        lines.append(title)
    walk(ds.get("ContentSequence") or [], 1 if title else 0)
    return "\n".join(lines)


def is_sr(ds: Dataset) -> bool:
    return ds.get("Modality") == "SR" or ("ContentSequence" in ds and "PixelData" not in ds)


def decode_frame(ds: Dataset, path: Path, index: int, n: int) -> np.ndarray:
    """Frame `index` of `n`, decoded: [rows, cols] or [rows, cols, 3] (colour already RGB, palettes applied).
    Called on objects `assemble` has checked (limits.check_dicom_pixels), which gave `n`.

    Frame by frame: only the frames sampled are decoded, and a 120-frame YBR ultrasound is not converted to RGB
    in float64 all at once (0.9 GB for a 6 MB file)."""
    from pydicom.pixels import apply_color_lut, pixel_array

    from medgemma_cli.inputs.limits import reduction

    factor = reduction(ds)
    try:
        arr = _decode_reduced(ds, index, n, factor) if factor > 1 else pixel_array(ds, index=index if n > 1 else None)
    except Exception as e:  # noqa: BLE001 - decoders raise many types; the message is what the user needs
        syntax = getattr(ds.file_meta.get("TransferSyntaxUID"), "name", "unknown transfer syntax")
        raise InputError(path, f"cannot decode the pixel data ({syntax}): {type(e).__name__}: {e}") from None
    if (n == 1 and arr.ndim >= 3 and arr.shape[-1] != 3) or arr.ndim == 4:  # a single-frame object with a frame axis
        arr = arr[0]
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:  # 16-bit palette entries → 8 bits
            arr = (arr.astype(np.float64) / 65535.0 * 255.0).round().astype(np.uint8)
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise InputError(path, f"unexpected pixel array shape {arr.shape}")
    return arr


def _decode_reduced(ds: Dataset, index: int, frames: int, factor: int) -> np.ndarray:
    """One JPEG or JPEG 2000 frame decoded by Pillow at 1/factor of its size (libjpeg's scaled DCT, OpenJPEG's
    resolution levels): a 16384² frame costs 1/64 of its memory. Colour comes back as RGB."""
    from pydicom.encaps import get_frame

    from medgemma_cli.inputs.images import open_unguarded

    data = get_frame(ds.PixelData, index, number_of_frames=frames)
    with open_unguarded(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft(im.mode, (im.size[0] // factor, im.size[1] // factor))
        else:
            im.reduce = int(math.log2(factor))  # JPEG 2000: decode that many resolution levels down
        im.load()
        if im.mode not in ("L", "RGB", "I;16", "I;16L", "I;16B", "I"):
            im = im.convert("RGB")
        return np.asarray(im)


def _frame_rescale(ds: Dataset, index: int) -> tuple[float, float] | None:
    """Rescale slope/intercept of one frame, including enhanced multi-frame functional groups."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    for groups, i in ((per, index), (ds.get("SharedFunctionalGroupsSequence"), 0)):
        if not groups or len(groups) <= i:
            continue
        seq = groups[i].get("PixelValueTransformationSequence")
        if seq:
            return number(seq[0], "RescaleSlope", 1.0) or 0.0, number(seq[0], "RescaleIntercept", 0.0) or 0.0
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return number(ds, "RescaleSlope", 1.0) or 0.0, number(ds, "RescaleIntercept", 0.0) or 0.0
    return None


def modality_values(ds: Dataset, frame: np.ndarray, index: int) -> np.ndarray:
    """Stored values → modality values (Hounsfield units for CT), all finite."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        x = apply_modality_lut(frame, ds).astype(np.float64)
    else:
        rescale = _frame_rescale(ds, index)
        x = frame.astype(np.float64)
        if rescale:
            x = x * rescale[0] + rescale[1]
    if not np.isfinite(x).all():  # a slope of 1e308 overflows: the image would be one flat value
        raise HeaderValueError("RescaleSlope/RescaleIntercept", f"{_frame_rescale(ds, index)}",
                               "give values beyond floating point")
    return x


def window(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI windowing straight to 0–255, by the header's VOILUTFunction (PS3.3 C.11.2.1.2–3): LINEAR (the
    default), LINEAR_EXACT, or SIGMOID — which keeps some contrast outside the window, where LINEAR clips."""
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError("window width not above 0")
        return 255.0 / (1.0 + np.exp(np.clip(-4.0 * (x - center) / width, -700.0, 700.0)))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError("window width not above 0")
        y = ((x - center) / width + 0.5) * 255.0
        return np.where(x <= center - width / 2, 0.0, np.where(x > center + width / 2, 255.0, y))
    if width < 1:
        raise ValueError("window width below 1")
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.where(x <= lo, 0.0, np.where(x > hi, 255.0, y))


VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def to_uint8(y: np.ndarray) -> np.ndarray:
    return np.clip(np.round(y), 0, 255).astype(np.uint8)


def minmax(x: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float64)
    return (x - lo) / (hi - lo) * 255.0


def grey_to_rgb(g: np.ndarray) -> np.ndarray:
    return np.repeat(g[..., None], 3, axis=-1)


def shrink(frame: np.ndarray) -> np.ndarray:
    """A frame over RENDER_PIXELS averaged over k×k blocks, in its own dtype: rendering works in float64, and a
    64 M-pixel frame would take 0.5 GB per intermediate array; the 896² the model sees changes very little."""
    from medgemma_cli.inputs.limits import RENDER_PIXELS

    h, w = frame.shape[:2]
    if h * w <= RENDER_PIXELS:
        return frame
    k = math.ceil(math.sqrt(h * w / RENDER_PIXELS))
    h2, w2 = h // k, w // k
    blocks = frame[:h2 * k, :w2 * k].reshape(h2, k, w2, k, *frame.shape[2:])
    return np.round(blocks.mean(axis=(1, 3), dtype=np.float32)).astype(frame.dtype)


def is_flat(rgb: np.ndarray) -> bool:
    return rgb.size == 0 or int(rgb.max()) == int(rgb.min())


def render_2d(ds: Dataset, frame: np.ndarray, index: int = 0, notes: list[str] | None = None) -> np.ndarray:
    """One grey or colour frame of a projection image (CR, DX, MG, US, SC…) as RGB uint8.

    A stored window or VOI LUT that is unusable, or that shows the image as one flat value, gives way to the
    full range of the values, and `notes` says so: a grey square is never what the model should see."""
    from pydicom.pixels import apply_voi_lut

    if frame.ndim == 3:  # colour
        if frame.dtype == np.uint8:
            return frame
        bits = int(number(ds, "BitsStored", 16) or 16)
        return to_uint8(frame.astype(np.float64) / float(2 ** min(max(bits, 1), 32) - 1) * 255.0)
    x = modality_values(ds, frame, index)
    y, why = None, ""
    try:
        if "VOILUTSequence" in ds:
            lut = apply_voi_lut(x.astype(np.int64) if np.allclose(x, np.round(x)) else x, ds, index=0)
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            y = lut.astype(np.float64) / float(2 ** min(max(bits, 1), 32) - 1) * 255.0
            why = "its VOI LUT"
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            why = "its window"
            center, width = number(ds, "WindowCenter"), number(ds, "WindowWidth")
            function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
            if function not in VOI_FUNCTIONS:
                if notes is not None:
                    notes.append(f"VOILUTFunction {printable(function)!r} is not a DICOM one; its window is applied "
                                 "as LINEAR")
                function = "LINEAR"
            if center is not None and width is not None:
                y = window(x, center, width, function)
    except (ValueError, TypeError, IndexError, AttributeError, KeyError) as e:
        if notes is not None:
            notes.append(f"{why} is unusable ({e}); the full range of values is shown")
        y = None
    g = to_uint8(minmax(x)) if y is None else to_uint8(y)
    if y is not None and is_flat(g) and not is_flat(full := to_uint8(minmax(x))):
        g = full
        if notes is not None:
            notes.append(f"{why} shows one flat value; the full range of values is shown instead")
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        g = 255 - g
    return grey_to_rgb(g)


def render_ct(hu: np.ndarray, notes: list[str] | None = None) -> np.ndarray:
    """Hounsfield units → three windows in R, G, B (clip, scale to 0–255, round)."""
    rgb = np.stack([to_uint8(minmax(np.clip(hu, lo, hi), lo, hi)) for lo, hi in CT_WINDOWS], axis=-1)
    if is_flat(rgb) and not is_flat(full := grey_to_rgb(to_uint8(minmax(hu)))):
        if notes is not None:
            notes.append("every value lies outside the CT windows; the full range of values is shown instead")
        return full
    return rgb


@dataclass
class Slice:
    """One 2-D image taken from a DICOM object (a file, or one frame of a multi-frame file)."""

    path: Path
    ds: Dataset
    frame: int
    position: float | None
    instance: int | None
    frames: int = 1  # in the object: its NumberOfFrames, checked


@dataclass
class Volume:
    """What one prompt gets from DICOM: one image, or an ordered, sampled series of slices."""

    series_uid: str
    study_uid: str
    modality: str
    slices: list[Slice]
    total_slices: int
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # slices left out and renderings changed, said out loud

    @property
    def is_volume(self) -> bool:
        return self.total_slices > 1


def _normal(item: Dataset) -> np.ndarray | None:
    iop = numbers(item, "ImageOrientationPatient", count=6)
    if iop is None:
        return None
    n = np.cross(np.array(iop[:3]), np.array(iop[3:]))
    return n if np.linalg.norm(n) > 0 else None


def _position(ds: Dataset, frame: int) -> float | None:
    """Where a frame lies along the slice normal; HeaderValueError when the geometry is there but unusable."""
    ipp = None
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per and len(per) > frame and per[frame].get("PlanePositionSequence"):
        ipp = numbers(per[frame].PlanePositionSequence[0], "ImagePositionPatient", count=3)
    ipp = ipp or numbers(ds, "ImagePositionPatient", count=3)
    normal = _normal(ds)
    if normal is None:
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared and shared[0].get("PlaneOrientationSequence"):
            normal = _normal(shared[0].PlaneOrientationSequence[0])
    if ipp is None or normal is None:
        return None
    return float(np.dot(np.array(ipp), normal))


def sample_evenly(n: int, k: int = MAX_SLICES) -> list[int]:
    """At most k indices spread evenly over range(n), first and last included."""
    if n <= k:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def share_slices(sizes: list[int], budget: int) -> list[int]:
    """Split a slice budget over volumes: small ones keep all their slices, the large ones share the rest
    equally; every volume keeps at least one, even past the budget (dropping a series silently is worse)."""
    out = [0] * len(sizes)
    left = budget
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    for rank, i in enumerate(order):
        out[i] = max(1, min(sizes[i], left // (len(sizes) - rank)))
        left -= out[i]
    return out


def assemble(datasets: list[tuple[Path, Any]], max_slices: int = MAX_SLICES) -> list[Volume]:
    """Group DICOM image objects into volumes (one per series; each multi-frame object is one too).

    `max_slices` bounds the slices of all volumes together (a study sent as one prompt must fit the context);
    each volume is sampled evenly along its axis. In a series of several files, a file whose ordering headers
    (InstanceNumber, position, orientation) are unusable is left out and the volume's notes say so; a lone
    file needs no order, so the same fault does not matter there."""
    from medgemma_cli.inputs.limits import check_dicom_pixels

    series: dict[str, list[Slice]] = {}
    heads: dict[str, Any] = {}
    faults: dict[str, list[tuple[Path, str]]] = {}
    broken: dict[str, list[InputError]] = {}
    for path, ds in datasets:
        with reading(path):
            uid = str(ds.get("SeriesInstanceUID", "") or "") or f"file:{path}"
        try:
            n = check_dicom_pixels(ds, path)  # a frame count is checked before anything is made per frame
        except InputError as e:
            broken.setdefault(uid, []).append(e)
            continue
        if n > 1:
            uid = f"{uid}/{ds.get('SOPInstanceUID', '') or path}"  # a multi-frame object is its own volume
        try:
            instance = integer(ds, "InstanceNumber")
            slices = [Slice(path, ds, f, _position(ds, f), instance, n) for f in range(n)]
        except HeaderValueError as e:
            if n > 1:  # the frames of one object: its own order is the frame order
                slices = [Slice(path, ds, f, None, None, n) for f in range(n)]
            else:
                slices = [Slice(path, ds, 0, None, None)]
                faults.setdefault(uid, []).append((path, str(e)))
        series.setdefault(uid, []).extend(slices)
        heads.setdefault(uid, ds)
    notes_of: dict[str, list[str]] = {}
    for uid, bad in faults.items():  # unorderable files are left out of a series that has others
        good = [s for s in series[uid] if s.path not in {p for p, _ in bad}]
        if good:
            series[uid] = good
            notes_of.setdefault(uid, []).extend(f"{p.name} left out of its series: {why}" for p, why in bad)
    for uid, errors in broken.items():  # files whose pixels cannot be what the header says, likewise
        home = next((k for k in series if k == uid or k.startswith(uid + "/")), None)
        if home is None:
            raise errors[0]
        notes_of.setdefault(home, []).extend(f"{e.path.name if e.path else '?'} left out of its series: {e.problem}"
                                            for e in errors)
    volumes = []
    shares = share_slices([len(v) for v in series.values()], max_slices)
    for (uid, slices), share in zip(series.items(), shares, strict=True):
        if all(s.position is not None for s in slices) and len({s.position for s in slices}) == len(slices):
            slices.sort(key=lambda s: s.position if s.position is not None else 0.0)
        elif all(s.instance is not None for s in slices):
            slices.sort(key=lambda s: (s.instance, s.frame))
        else:
            slices.sort(key=lambda s: (str(s.path), s.frame))
        head = heads[uid]
        chosen = [slices[i] for i in sample_evenly(len(slices), share)]
        volumes.append(Volume(uid.split("/")[0], str(head.get("StudyInstanceUID", "") or ""),
                              str(head.get("Modality", "") or ""), chosen, len(slices), safe_metadata(head),
                              notes_of.get(uid, [])))
    return volumes


def render_volume(vol: Volume) -> list[np.ndarray]:
    """RGB uint8 images of a volume's chosen slices, rendered by modality.

    A slice that cannot be rendered, or renders blank, is an error for a lone image; in a series it is left
    out (`vol.slices` shrinks) and `vol.notes` says which and why, as long as one slice is left."""
    mr_values: dict[int, np.ndarray] = {}  # MR grey slices: scaled together once all are read

    def one(s: Slice) -> np.ndarray | None:
        notes: list[str] = []
        with reading(s.path):
            f = shrink(decode_frame(s.ds, s.path, s.frame, s.frames))
            if vol.modality == "MR" and f.ndim == 2:
                x = modality_values(s.ds, f, s.frame)
                if float(x.max()) == float(x.min()):
                    raise InputError(s.path, "the image is blank: every pixel has the same value")
                mr_values[id(s)] = x
                return None
            rgb = render_ct(modality_values(s.ds, f, s.frame), notes) if vol.modality == "CT" and f.ndim == 2 \
                else render_2d(s.ds, f, s.frame, notes)
        if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
            raise InputError(s.path, f"renders as an array of shape {rgb.shape}, not an image")
        if is_flat(rgb):
            raise InputError(s.path, "the image is blank: every pixel has the same value")
        vol.notes.extend(f"{s.path.name}: {n}" for n in dict.fromkeys(notes))
        return rgb

    kept: list[tuple[Slice, np.ndarray | None]] = []
    failed: list[InputError] = []
    for s in vol.slices:
        try:
            kept.append((s, one(s)))
        except InputError as e:
            if not vol.is_volume:
                raise
            failed.append(e)
    if not kept:
        raise failed[0]
    if failed:
        vol.notes.extend(f"{e.path.name if e.path else '?'} left out: {e.problem}" for e in failed)
        vol.slices = [s for s, _ in kept]
    if mr_values:  # min–max over the whole volume, so slices keep their relative brightness
        lo = min(float(v.min()) for v in mr_values.values())
        hi = max(float(v.max()) for v in mr_values.values())
        return [grey_to_rgb(to_uint8(minmax(mr_values[id(s)], lo, hi))) if rgb is None else rgb for s, rgb in kept]
    return [rgb for _, rgb in kept if rgb is not None]
