"""DICOM → what MedGemma sees.

2-D images: modality LUT, VOI (window or LUT), MONOCHROME1 inverted, colour spaces to RGB. CT: Hounsfield
units packed into three windows (R −1024..1024, G −135..215, B 0..80 HU). MR: min–max over the whole
volume, grey. Series are grouped by SeriesInstanceUID and ordered along the slice normal; multi-frame
objects are volumes too. Decoding goes through pydicom's pixel backends (pylibjpeg plugins for JPEG,
JPEG-LS, JPEG 2000, RLE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from medgemma_cli.errors import InputError
from medgemma_cli.offline import import_pydicom

MAX_SLICES = 85  # 85 × 256 image tokens stay under a 32K context (MedGemma 1.5 recipe)
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


def read(path: Path, *, pixels: bool = True) -> Any:
    pydicom = import_pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from e


def safe_metadata(ds: Any) -> dict[str, str]:
    """Only non-identifying fields: modality, body part, view, age, sex. Never names, IDs or dates."""
    out = {}
    for tag in SAFE_TAGS:
        value = ds.get(tag)
        if value not in (None, ""):
            out[tag] = str(value)
    return out


def sr_text(ds: Any) -> str:
    """The text content of a Structured Report: concept names and values, identifying items left out."""
    lines: list[str] = []

    def name_of(item: Any) -> str:
        seq = item.get("ConceptNameCodeSequence")
        return str(seq[0].CodeMeaning) if seq else ""

    def walk(items: Iterable[Any], depth: int) -> None:
        for item in items:
            vt = item.get("ValueType", "")
            name = name_of(item)
            value = ""
            if vt in SR_SKIP_VALUE_TYPES:
                continue
            if vt == "TEXT":
                value = str(item.get("TextValue", ""))
            elif vt == "CODE" and item.get("ConceptCodeSequence"):
                value = str(item.ConceptCodeSequence[0].CodeMeaning)
            elif vt == "NUM" and item.get("MeasuredValueSequence"):
                mv = item.MeasuredValueSequence[0]
                units = mv.get("MeasurementUnitsCodeSequence")
                value = f"{mv.NumericValue} {units[0].CodeValue if units else ''}".strip()
            if name or value:
                lines.append("  " * depth + (f"{name}: {value}" if name and value else name or value))
            if item.get("ContentSequence"):
                walk(item.ContentSequence, depth + 1)

    title = name_of(ds)
    if title:
        lines.append(title)
    walk(ds.get("ContentSequence", []), 1 if title else 0)
    return "\n".join(lines)


def is_sr(ds: Any) -> bool:
    return ds.get("Modality") == "SR" or "ContentSequence" in ds and "PixelData" not in ds


def frames(ds: Any, path: Path) -> np.ndarray:
    """Decoded pixel values, [frames, rows, cols] or [frames, rows, cols, 3] (colour already RGB)."""
    from pydicom.pixels import apply_color_lut

    from medgemma_cli.inputs.limits import check_dicom_pixels

    n = check_dicom_pixels(ds, path)  # before decoding: sizes, frame count, the codestream's own header
    try:
        arr = ds.pixel_array
    except Exception as e:  # decoders raise many types; the message is what the user needs
        raise InputError(path, f"cannot decode the pixel data ({ds.file_meta.TransferSyntaxUID.name}): {e}") from e
    if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:  # 16-bit palette entries → 8 bits
            arr = (arr.astype(np.float64) / 65535.0 * 255.0).round().astype(np.uint8)
    colour = arr.ndim == (4 if n > 1 else 3) and arr.shape[-1] == 3
    if n == 1:
        arr = arr[None]
    if not colour and arr.ndim != 3:
        raise InputError(path, f"unexpected pixel array shape {arr.shape}")
    return arr


def _frame_rescale(ds: Any, index: int) -> tuple[float, float] | None:
    """Rescale slope/intercept of one frame, including enhanced multi-frame functional groups."""
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        g = groups[index] if len(groups) > index and groups is ds.get("PerFrameFunctionalGroupsSequence") else groups[0]
        seq = g.get("PixelValueTransformationSequence")
        if seq:
            return float(seq[0].get("RescaleSlope", 1.0)), float(seq[0].get("RescaleIntercept", 0.0))
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    return None


def modality_values(ds: Any, frame: np.ndarray, index: int) -> np.ndarray:
    """Stored values → modality values (Hounsfield units for CT)."""
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(frame, ds).astype(np.float64)
    rescale = _frame_rescale(ds, index)
    x = frame.astype(np.float64)
    return x * rescale[0] + rescale[1] if rescale else x


def window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM linear VOI windowing (PS3.3 C.11.2.1.2.1) straight to 0–255."""
    if width < 1:
        raise ValueError("window width below 1")
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.where(x <= lo, 0.0, np.where(x > hi, 255.0, y))


def _first(value: Any) -> float:
    try:
        return float(value[0])
    except (TypeError, IndexError):
        return float(value)


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


def render_2d(ds: Any, frame: np.ndarray, index: int = 0) -> np.ndarray:
    """One grey or colour frame of a projection image (CR, DX, MG, US, SC…) as RGB uint8."""
    from pydicom.pixels import apply_voi_lut

    if frame.ndim == 3:  # colour
        if frame.dtype == np.uint8:
            return frame
        return to_uint8(frame.astype(np.float64) / float(2 ** int(ds.get("BitsStored", 16)) - 1) * 255.0)
    x = modality_values(ds, frame, index)
    if "VOILUTSequence" in ds:
        lut = apply_voi_lut(x.astype(np.int64) if np.allclose(x, np.round(x)) else x, ds, index=0)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        y = lut.astype(np.float64) / float(2**bits - 1) * 255.0
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        y = window(x, _first(ds.WindowCenter), _first(ds.WindowWidth))
    else:
        y = minmax(x)
    g = to_uint8(y)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        g = 255 - g
    return grey_to_rgb(g)


def render_ct(hu: np.ndarray) -> np.ndarray:
    """Hounsfield units → three windows in R, G, B (clip, scale to 0–255, round)."""
    return np.stack([to_uint8(minmax(np.clip(hu, lo, hi), lo, hi)) for lo, hi in CT_WINDOWS], axis=-1)


@dataclass
class Slice:
    """One 2-D image taken from a DICOM object (a file, or one frame of a multi-frame file)."""

    path: Path
    ds: Any
    frame: int
    position: float | None
    instance: int | None


@dataclass
class Volume:
    """What one prompt gets from DICOM: one image, or an ordered, sampled series of slices."""

    series_uid: str
    study_uid: str
    modality: str
    slices: list[Slice]
    total_slices: int
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def is_volume(self) -> bool:
        return self.total_slices > 1


def _normal(ds: Any) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if not iop or len(iop) != 6:
        return None
    r, c = np.array(iop[:3], float), np.array(iop[3:], float)
    n = np.cross(r, c)
    return n if np.linalg.norm(n) > 0 else None


def _position(ds: Any, frame: int) -> float | None:
    ipp = None
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per and len(per) > frame and per[frame].get("PlanePositionSequence"):
        ipp = per[frame].PlanePositionSequence[0].get("ImagePositionPatient")
    ipp = ipp or ds.get("ImagePositionPatient")
    normal = _normal(ds)
    if normal is None:
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared and shared[0].get("PlaneOrientationSequence"):
            iop = shared[0].PlaneOrientationSequence[0].get("ImageOrientationPatient")
            if iop and len(iop) == 6:
                normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
    if ipp is None or normal is None:
        return None
    return float(np.dot(np.array(ipp, float), normal))


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
    each volume is sampled evenly along its axis."""
    series: dict[str, list[Slice]] = {}
    heads: dict[str, Any] = {}
    from medgemma_cli.inputs.limits import check_dicom_pixels

    for path, ds in datasets:
        n = check_dicom_pixels(ds, path)  # a frame count from the header is checked before anything is made per frame
        uid = str(ds.get("SeriesInstanceUID", "")) or f"file:{path}"
        if n > 1:
            uid = f"{uid}/{ds.get('SOPInstanceUID', path)}"  # a multi-frame object is its own volume
        for f in range(n):
            series.setdefault(uid, []).append(Slice(path, ds, f, _position(ds, f),
                                                    int(ds.InstanceNumber) if ds.get("InstanceNumber") is not None else None))
        heads.setdefault(uid, ds)
    volumes = []
    shares = share_slices([len(v) for v in series.values()], max_slices)
    for (uid, slices), share in zip(series.items(), shares, strict=True):
        if all(s.position is not None for s in slices) and len({s.position for s in slices}) == len(slices):
            slices.sort(key=lambda s: s.position)
        elif all(s.instance is not None for s in slices):
            slices.sort(key=lambda s: (s.instance, s.frame))
        else:
            slices.sort(key=lambda s: (str(s.path), s.frame))
        head = heads[uid]
        chosen = [slices[i] for i in sample_evenly(len(slices), share)]
        volumes.append(Volume(uid.split("/")[0], str(head.get("StudyInstanceUID", "")), str(head.get("Modality", "")),
                              chosen, len(slices), safe_metadata(head)))
    return volumes


def render_volume(vol: Volume) -> list[np.ndarray]:
    """RGB uint8 images of a volume's chosen slices, rendered by modality."""
    pixel_cache: dict[Path, np.ndarray] = {}

    def frame_of(s: Slice) -> np.ndarray:
        if s.path not in pixel_cache:
            pixel_cache[s.path] = frames(s.ds, s.path)
        return pixel_cache[s.path][s.frame]

    if vol.modality == "CT":
        out = []
        for s in vol.slices:
            f = frame_of(s)
            out.append(render_ct(modality_values(s.ds, f, s.frame)) if f.ndim == 2 else render_2d(s.ds, f, s.frame))
        return out
    if vol.modality == "MR":
        values = [modality_values(s.ds, frame_of(s), s.frame) for s in vol.slices]
        lo = min(float(v.min()) for v in values)
        hi = max(float(v.max()) for v in values)
        return [grey_to_rgb(to_uint8(minmax(v, lo, hi))) for v in values]
    return [render_2d(s.ds, frame_of(s), s.frame) for s in vol.slices]
