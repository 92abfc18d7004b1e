"""Whole-slide images → the tissue patches MedGemma 1.5 reads (its WSI recipe, see the README).

One magnification per slide (the pyramid level whose pixel spacing is closest to 5×, 10× or 20×), a tissue
mask from a low-resolution level (mean luminance per patch cell in [1/255, 0.8]: white glass is not tissue),
non-overlapping 896 px patches on that level's grid, at most `max_patches` of them spread evenly over the
tissue cells and kept in raster order (the technical report keeps spatial order).

Two readers, one interface (`SlideReader.region`): nothing ever holds a whole level, only the tiles under the
region asked for (and a few recent ones), so a 100,000 × 80,000 px level costs what one patch costs.

- DICOM VL Whole Slide Microscopy (TILED_FULL and TILED_SPARSE) through pydicom and our own frame index, not
  wsidicom: we already read DICOM with pydicom (hardened, size-checked headers) and decode frames through its
  pylibjpeg/Pillow backends; a WSI instance is one multi-frame object whose frames are tiles, so the reader
  needs only each frame's byte offset (the offset tables or the fragment headers, read without the pixel data)
  and the tile position (frame order, or the per-frame PlanePositionSlideSequence). wsidicom would add a second
  DICOM stack with its own dependencies (among them a DICOMweb HTTP client we must not ship into an offline tool)
  for what these ~150 lines do.
- Vendor formats (SVS, NDPI, MRXS, SCN, pyramidal TIFF…) through OpenSlide (openslide-python with the library
  from the openslide-bin wheel).
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medgemma_cli.defaults import DEFAULT_MAGNIFICATION, MAX_PATCHES
from medgemma_cli.errors import InputError

if TYPE_CHECKING:
    from pydicom import Dataset

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
SLIDE_SUFFIXES = {".svs", ".ndpi", ".tif", ".tiff", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
PATCH = 896
MAGNIFICATIONS = {"5x": 2.0, "10x": 1.0, "20x": 0.5}  # µm per pixel, by the 40× = 0.25 µm/px convention
ASSUMED_BASE_MPP = 0.25  # a slide without pixel spacing: its full resolution is taken as 40×, and said so
MASK_LUMINANCE = (1 / 255, 0.8)  # a cell is tissue when its mean grey lies in this range (white glass is ~0.9+)
MASK_CELL_PIXELS = 4  # the mask level is the coarsest one where a patch cell still spans this many pixels
TILE_CACHE_BYTES = 64 << 20
MAX_CELLS = 4_000_000  # 896 px cells on one level: a 1.8 M × 1.8 M px level; real slides have < 100,000
OVERVIEW = 512  # the longer side of the slide overview in batch reports


def is_slide_file(path: Path) -> bool:
    """A vendor slide, by suffix (OpenSlide tells the formats apart when it opens it)."""
    return path.suffix.lower() in SLIDE_SUFFIXES


def is_wsi_file(path: Path) -> bool:
    """A DICOM WSI instance, told by its file meta header alone (a few hundred bytes)."""
    from pydicom.filereader import read_file_meta_info

    try:
        return str(read_file_meta_info(path).get("MediaStorageSOPClassUID", "")) == WSI_SOP_CLASS
    except Exception:  # noqa: BLE001 - not readable as DICOM: the ordinary reader says why, later
        return False


@dataclass
class Level:
    width: int
    height: int
    downsample: float  # against level 0


class SlideReader:
    """A pyramid of levels, read region by region."""

    name: str
    path: Path  # the file errors name (a DICOM slide: its full-resolution instance)
    levels: list[Level]
    base_mpp: float | None  # level 0's pixel spacing in µm, when the slide says

    def region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 h×w×3 of `level` at (x, y) in that level's pixels; white beyond the slide or missing tiles."""
        raise NotImplementedError

    def close(self) -> None:
        pass


# -- OpenSlide ------------------------------------------------------------------------------------------------------

class OpenSlideReader(SlideReader):
    def __init__(self, path: Path):
        try:
            import openslide
        except ImportError as e:  # the library comes in the openslide-bin wheel
            raise InputError(path, f"slides need OpenSlide (pip install openslide-python openslide-bin): {e}"
                             ) from None
        try:
            if openslide.OpenSlide.detect_format(str(path)) is None:
                raise InputError(path, "not a whole-slide image OpenSlide can read (SVS, NDPI, MRXS, SCN, "
                                       "tiled pyramidal TIFF…)")
            self._slide = openslide.OpenSlide(str(path))
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - OpenSlideError, OSError…: this file's problem
            raise InputError(path, f"not a readable slide ({type(e).__name__}: {e})") from None
        self.path = path
        self.name = path.name
        self.levels = [Level(int(w), int(h), float(d)) for (w, h), d in
                       zip(self._slide.level_dimensions, self._slide.level_downsamples, strict=True)]
        mpp = self._slide.properties.get("openslide.mpp-x")
        try:
            self.base_mpp = float(mpp) if mpp not in (None, "") and float(mpp) > 0 else None
        except ValueError:
            self.base_mpp = None

    def region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        from PIL import Image

        d = self.levels[level].downsample
        try:
            rgba = self._slide.read_region((round(x * d), round(y * d)), level, (w, h))
        except Exception as e:  # noqa: BLE001 - a damaged tile deep in the file
            raise InputError(self.path, f"cannot read a region ({type(e).__name__}: {e})") from None
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))

    def close(self) -> None:
        self._slide.close()


# -- DICOM WSI ------------------------------------------------------------------------------------------------------

_PILLOW_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",  # JPEG baseline / extended
                    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}  # JPEG 2000


class _Instance:
    """One pyramid level stored as one multi-frame object: frame i is a tile; its bytes are found by offset."""

    def __init__(self, path: Path, ds: Dataset):
        from medgemma_cli.inputs.dicom import integer, numbers
        from medgemma_cli.inputs.limits import check_image_size

        self.path = path
        self.ds = ds
        with_pixels = _header(path)
        self.syntax = with_pixels.syntax
        self.value_at = with_pixels.value_at
        self.encapsulated = with_pixels.encapsulated
        try:
            self.width = integer(ds, "TotalPixelMatrixColumns") or 0
            self.height = integer(ds, "TotalPixelMatrixRows") or 0
            self.tile_w, self.tile_h = int(ds.Columns), int(ds.Rows)
            self.frames = integer(ds, "NumberOfFrames") or 1
            self.samples = int(ds.get("SamplesPerPixel", 1) or 1)
            self.bits = int(ds.BitsAllocated)
        except (AttributeError, TypeError, ValueError) as e:
            raise InputError(path, f"whole-slide header unusable ({e})") from None
        if self.width <= 0 or self.height <= 0:
            raise InputError(path, "whole-slide instance without TotalPixelMatrixColumns/Rows")
        check_image_size(path, self.tile_w, self.tile_h)  # one tile is decoded at a time
        if self.bits != 8 or self.samples not in (1, 3):
            raise InputError(path, f"{self.samples} sample(s) of {self.bits} bits: slides are read as 8-bit grey or "
                                   "colour")
        self.across = -(-self.width // self.tile_w)
        self.down = -(-self.height // self.tile_h)
        self.spacing_um: float | None = None
        shared = ds.get("SharedFunctionalGroupsSequence")
        measures = shared[0].get("PixelMeasuresSequence") if shared else None
        try:
            spacing = numbers(measures[0], "PixelSpacing", count=2) if measures else None
        except ValueError:
            spacing = None
        if spacing and spacing[1] > 0:
            self.spacing_um = spacing[1] * 1000.0  # PixelSpacing is in mm, (row, column)
        self.tiles: dict[tuple[int, int], int] = {}
        sparse = str(ds.get("DimensionOrganizationType", "") or "").upper() == "TILED_SPARSE"
        if sparse:
            per = ds.get("PerFrameFunctionalGroupsSequence") or []
            if len(per) < self.frames:
                raise InputError(path, f"TILED_SPARSE with {len(per)} per-frame positions for {self.frames} frames")
            for i in range(self.frames):
                pos = per[i].get("PlanePositionSlideSequence")
                if not pos:
                    raise InputError(path, f"TILED_SPARSE frame {i + 1} has no PlanePositionSlideSequence")
                col = integer(pos[0], "ColumnPositionInTotalImagePixelMatrix") or 1
                row = integer(pos[0], "RowPositionInTotalImagePixelMatrix") or 1
                key = ((col - 1) // self.tile_w, (row - 1) // self.tile_h)
                self.tiles.setdefault(key, i)  # other focal planes / optical paths: the first is read
        elif self.across * self.down > self.frames:
            raise InputError(path, f"TILED_FULL {self.width}×{self.height} in {self.tile_w}×{self.tile_h} tiles needs "
                                   f"{self.across * self.down:,} frames, the object has {self.frames:,}")
        # a header may declare any size: the frames must fit in the file (8 bytes of item header at least, or a
        # whole tile uncompressed), so a small file cannot make the tissue search walk a billion cells
        least = 8 if self.encapsulated else self.tile_w * self.tile_h * self.samples
        if self.frames * least > with_pixels.length:
            raise InputError(path, f"declares {self.frames:,} frames of {self.tile_w}×{self.tile_h}, more than its "
                                   f"{with_pixels.length:,} bytes of pixel data can hold")
        if (self.width // PATCH) * (self.height // PATCH) > MAX_CELLS:
            raise InputError(path, f"a {self.width}×{self.height} level is over {MAX_CELLS:,} patch cells")
        self.sparse = sparse
        self._offsets: list[tuple[int, int]] | None = None
        self._file: io.BufferedReader | None = None

    def frame_of(self, tx: int, ty: int) -> int | None:
        if self.sparse:
            return self.tiles.get((tx, ty))
        return ty * self.across + tx  # the first focal plane and optical path come first (PS3.3 C.8.12.4.1.3)

    def _fp(self) -> io.BufferedReader:
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        return self._file

    def _frame_offsets(self) -> list[tuple[int, int]]:
        """(offset, length) of each frame's encoded bytes, read from the fragment headers only."""
        if self._offsets is not None:
            return self._offsets
        f = self._fp()
        size = os.fstat(f.fileno()).st_size
        f.seek(self.value_at)
        items: list[tuple[int, int]] = []
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise InputError(self.path, "the encapsulated pixel data ends without its delimiter")
            tag, length = struct.unpack("<II", head)
            if tag == 0xE0DDFFFE:  # sequence delimiter
                break
            if tag != 0xE000FFFE or length == 0xFFFFFFFF or f.tell() + length > size:
                raise InputError(self.path, "damaged encapsulated pixel data (a fragment header is wrong)")
            items.append((f.tell(), length))
            f.seek(length, os.SEEK_CUR)
        fragments = items[1:]  # the first item is the basic offset table
        if len(fragments) != self.frames:  # several fragments per frame: the tables say where frames start
            raise InputError(self.path, f"{len(fragments)} fragments for {self.frames} frames: only one fragment per "
                                        "frame is read in whole-slide images")
        self._offsets = fragments
        return fragments

    def frame_bytes(self, index: int) -> bytes:
        f = self._fp()
        if self.encapsulated:
            offset, length = self._frame_offsets()[index]
        else:
            length = self.tile_w * self.tile_h * self.samples
            offset = self.value_at + index * length
        f.seek(offset)
        data = f.read(length)
        if len(data) != length:
            raise InputError(self.path, f"frame {index + 1} is cut short")
        return data

    def tile(self, index: int) -> np.ndarray:
        data = self.frame_bytes(index)
        try:
            if self.syntax in _PILLOW_SYNTAXES:
                from medgemma_cli.inputs.images import open_unguarded

                with open_unguarded(io.BytesIO(data)) as im:
                    if im.size[0] * im.size[1] > self.tile_w * self.tile_h:
                        raise InputError(self.path, f"a tile says {im.size[0]}×{im.size[1]}, the header "
                                                    f"{self.tile_w}×{self.tile_h}")
                    arr = np.asarray(im.convert("RGB"))
            elif not self.encapsulated:
                arr = np.frombuffer(data, np.uint8).reshape(self.tile_h, self.tile_w, self.samples)
                if self.samples == 3 and str(self.ds.get("PhotometricInterpretation", "")).startswith("YBR"):
                    from pydicom.pixels import convert_color_space

                    arr = convert_color_space(arr, str(self.ds.PhotometricInterpretation), "RGB")
            else:
                arr = self._decode_other(data)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - decoders raise many types; the message is what the user needs
            raise InputError(self.path, f"cannot decode tile frame {index + 1}: {type(e).__name__}: {e}") from None
        if arr.ndim == 2 or arr.shape[-1] == 1:
            arr = np.repeat(arr.reshape(arr.shape[0], arr.shape[1], 1), 3, axis=-1)
        return arr[: self.tile_h, : self.tile_w]

    def _decode_other(self, data: bytes) -> np.ndarray:
        """RLE, JPEG-LS, JPEG lossless… through pydicom's decoders, one frame at a time."""
        from pydicom.encaps import encapsulate
        from pydicom.pixels import get_decoder
        from pydicom.uid import UID

        opts: dict[str, Any] = dict(
            rows=self.tile_h, columns=self.tile_w, samples_per_pixel=self.samples, bits_allocated=8, bits_stored=8,
            pixel_representation=0, number_of_frames=1,
            photometric_interpretation=str(self.ds.get("PhotometricInterpretation", "RGB")),
            planar_configuration=int(self.ds.get("PlanarConfiguration", 0) or 0), transfer_syntax_uid=UID(self.syntax))
        arr, _ = get_decoder(self.syntax).as_array(encapsulate([data]), **opts)
        return np.asarray(arr, dtype=np.uint8)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class _PixelsAt:
    syntax: str
    value_at: int  # where the pixel data's value starts in the file
    encapsulated: bool
    length: int  # of the value: the file's rest for encapsulated data


def _header(path: Path) -> _PixelsAt:
    """Where the pixel data starts, found by reading the header up to it (never the pixel data itself)."""
    from medgemma_cli.offline import import_pydicom

    pydicom = import_pydicom()
    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True)  # leaves the file at the pixel data's tag
            syntax = ds.file_meta.get("TransferSyntaxUID")
            at = f.tell()
            head = f.read(12)
    except Exception as e:  # noqa: BLE001 - whatever pydicom raises on this file's bytes is this file's problem
        raise InputError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from None
    if syntax is None or not syntax.is_little_endian:
        raise InputError(path, "whole-slide images are read in little-endian transfer syntaxes only")
    if len(head) < 8 or struct.unpack("<HH", head[:4]) != (0x7FE0, 0x0010):
        raise InputError(path, "a whole-slide instance without pixel data")
    if syntax.is_implicit_VR:
        value_at, length = at + 8, struct.unpack("<I", head[4:8])[0]
    else:
        value_at, length = at + 12, struct.unpack("<I", head[8:12])[0]
    encapsulated = bool(syntax.is_compressed)
    if encapsulated != (length == 0xFFFFFFFF):
        raise InputError(path, "the pixel data's length does not match its transfer syntax")
    size = os.path.getsize(path)
    return _PixelsAt(str(syntax), value_at, encapsulated, size - value_at if encapsulated else length)


class DicomSlideReader(SlideReader):
    """The pyramid of one series: each VOLUME instance is a level (LABEL and OVERVIEW images are never read: a
    label carries the patient's name)."""

    def __init__(self, datasets: list[tuple[Path, Any]]):
        instances: list[_Instance] = []
        for path, ds in datasets:
            kind = [str(v).upper() for v in (ds.get("ImageType") or [])]
            if len(kind) >= 3 and kind[2] not in ("VOLUME", "THUMBNAIL"):
                continue  # LABEL, OVERVIEW
            from medgemma_cli.inputs.dicom import reading

            with reading(path):  # a hostile header value: one line naming the file
                instances.append(_Instance(path, ds))
        if not instances:
            raise InputError(datasets[0][0], "whole-slide series without a pyramid level (only labels/overviews)")
        by_size: dict[tuple[int, int], _Instance] = {}
        for inst in sorted(instances, key=lambda i: -i.width * i.height):
            by_size.setdefault((inst.width, inst.height), inst)  # other focal planes / optical paths: the first
        self.instances = list(by_size.values())
        top = self.instances[0]
        self.name, self.path = top.path.name, top.path
        self.levels = [Level(i.width, i.height, top.width / i.width) for i in self.instances]
        self.base_mpp = top.spacing_um
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = 0

    def _tile(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        arr = self.instances[level].tile(index)
        self._cache[key] = arr
        self._cached += arr.nbytes
        while self._cached > TILE_CACHE_BYTES and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return arr

    def region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        inst = self.instances[level]
        out = np.full((h, w, 3), 255, np.uint8)
        x1, y1 = min(x + w, inst.width), min(y + h, inst.height)
        if x1 <= max(x, 0) or y1 <= max(y, 0):
            return out
        for ty in range(max(y, 0) // inst.tile_h, (y1 - 1) // inst.tile_h + 1):
            for tx in range(max(x, 0) // inst.tile_w, (x1 - 1) // inst.tile_w + 1):
                index = inst.frame_of(tx, ty)
                if index is None:
                    continue  # TILED_SPARSE: no tile stored here, glass
                tile = self._tile(level, index)
                tx0, ty0 = tx * inst.tile_w, ty * inst.tile_h
                sx0, sy0 = max(x, tx0), max(y, ty0)
                sx1, sy1 = min(x1, tx0 + tile.shape[1]), min(y1, ty0 + tile.shape[0])
                if sx1 > sx0 and sy1 > sy0:
                    out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[sy0 - ty0:sy1 - ty0, sx0 - tx0:sx1 - tx0]
        return out

    def close(self) -> None:
        for inst in self.instances:
            inst.close()
        self._cache.clear()


# -- the recipe -----------------------------------------------------------------------------------------------------

@dataclass
class SlidePlan:
    """What the model gets from one slide, and how it was chosen."""

    name: str
    level: int
    level_size: tuple[int, int]
    mpp: float  # of the chosen level, µm per pixel
    magnification: str  # asked for
    cells: list[tuple[int, int]]  # (column, row) of every tissue cell, raster order
    chosen: list[tuple[int, int]]  # at most max_patches of them, raster order
    grid: tuple[int, int]  # columns, rows of whole patches on the level
    notes: list[str] = field(default_factory=list)

    @property
    def actual_magnification(self) -> float:
        return 10.0 / self.mpp

    def describe(self) -> str:
        w, h = self.level_size
        return (f"slide, level {self.level} ({self.actual_magnification:.1f}×, {self.mpp:.2f} µm/px, {w}×{h}), "
                f"{len(self.chosen)} of {len(self.cells)} tissue patches of {PATCH} px")


def choose_level(reader: SlideReader, magnification: str = DEFAULT_MAGNIFICATION) -> tuple[int, float, list[str]]:
    """The level whose pixel spacing is closest (by ratio) to the magnification asked for: (index, µm/px, notes)."""
    if magnification not in MAGNIFICATIONS:
        raise InputError(None, f"magnification {magnification!r}: choose {', '.join(MAGNIFICATIONS)}")
    notes = []
    base = reader.base_mpp
    if base is None:
        base = ASSUMED_BASE_MPP
        notes.append(f"{reader.name}: no pixel spacing; its full resolution is taken as 40× ({base} µm/px)")
    target = MAGNIFICATIONS[magnification]
    mpps = [base * lv.downsample for lv in reader.levels]
    best = min(range(len(mpps)), key=lambda i: (abs(math.log(mpps[i] / target)), i))
    if abs(math.log(mpps[best] / target)) > math.log(1.5):
        notes.append(f"{reader.name}: no level near {magnification}; the closest is {10 / mpps[best]:.1f}× "
                     f"({mpps[best]:.2f} µm/px)")
    return best, mpps[best], notes


def tissue_cells(reader: SlideReader, level: int) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """The patch cells of `level` that hold tissue, in raster order, and the grid size (columns, rows).

    Read from the coarsest level where a cell still spans MASK_CELL_PIXELS pixels, one row of cells at a time
    (in column blocks): the mask never needs a whole level either."""
    lv = reader.levels[level]
    cols, rows = lv.width // PATCH, lv.height // PATCH
    if cols == 0 or rows == 0:
        return [], (cols, rows)
    mask_level = level
    for i, m in enumerate(reader.levels):
        if i > level and PATCH * lv.downsample / m.downsample >= MASK_CELL_PIXELS:
            mask_level = i
    m = reader.levels[mask_level]
    scale = lv.downsample / m.downsample  # chosen-level pixels → mask-level pixels
    edges_x = [round(c * PATCH * scale) for c in range(cols + 1)]
    edges_y = [round(r * PATCH * scale) for r in range(rows + 1)]
    block = max(1, 4096 // max(1, edges_x[1] - edges_x[0]))  # cells per read, ~4096 mask pixels wide
    lo, hi = MASK_LUMINANCE
    cells = []
    for r in range(rows):
        y0, y1 = edges_y[r], max(edges_y[r + 1], edges_y[r] + 1)
        for c0 in range(0, cols, block):
            c1 = min(cols, c0 + block)
            x0, x1 = edges_x[c0], max(edges_x[c1], edges_x[c0] + 1)
            strip = reader.region(mask_level, x0, y0, x1 - x0, y1 - y0)
            grey = strip.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
            for c in range(c0, c1):
                a, b = edges_x[c] - x0, max(edges_x[c + 1], edges_x[c] + 1) - x0
                mean = float(grey[:, a:b].mean())
                if lo <= mean <= hi:
                    cells.append((c, r))
    return cells, (cols, rows)


def sample_cells(cells: list[tuple[int, int]], most: int) -> list[tuple[int, int]]:
    """At most `most` cells spread evenly over the tissue, kept in raster order (first and last included)."""
    from medgemma_cli.inputs.dicom import sample_evenly

    return [cells[i] for i in sample_evenly(len(cells), max(1, most))]


def plan(reader: SlideReader, magnification: str = DEFAULT_MAGNIFICATION, max_patches: int = MAX_PATCHES
         ) -> SlidePlan:
    level, mpp, notes = choose_level(reader, magnification)
    cells, grid = tissue_cells(reader, level)
    lv = reader.levels[level]
    if not cells:
        raise InputError(None, f"{reader.name}: no tissue found at {magnification} (no {PATCH} px cell with mean "
                               f"luminance in [1/255, 0.8] on the {lv.width}×{lv.height} level)")
    out = SlidePlan(reader.name, level, (lv.width, lv.height), mpp, magnification, cells, cells, grid, notes)
    return limit_patches(out, max_patches)


def limit_patches(p: SlidePlan, most: int) -> SlidePlan:
    """Keep at most `most` of the tissue cells (evenly, raster order), and say so when some are left out."""
    p.chosen = sample_cells(p.cells, most)
    p.notes = [n for n in p.notes if "sampled evenly" not in n]
    if len(p.chosen) < len(p.cells):
        p.notes.append(f"{p.name}: {len(p.cells)} tissue patches, {len(p.chosen)} sampled evenly in raster order")
    return p


def patches(reader: SlideReader, p: SlidePlan):  # -> Iterator[np.ndarray]
    """The chosen patches, 896×896 RGB uint8, one at a time."""
    for c, r in p.chosen:
        yield reader.region(p.level, c * PATCH, r * PATCH, PATCH, PATCH)


def overview(reader: SlideReader, p: SlidePlan, size: int = OVERVIEW) -> np.ndarray:
    """The slide small, the chosen patches outlined: for the batch report (what the model saw, and where)."""
    from PIL import Image, ImageDraw

    small = len(reader.levels) - 1
    lv = reader.levels[small]
    if lv.width * lv.height > 64_000_000:  # no small level (one huge level): the grid stands in for the picture
        return _grid_overview(p, size)
    step = max(1, math.ceil(max(lv.width, lv.height) / (size * 4)))  # rows read in strips, kept small
    k = size / max(lv.width, lv.height)
    canvas = Image.new("RGB", (max(1, round(lv.width * k)), max(1, round(lv.height * k))), "white")
    rows = max(1, math.ceil(4096 * 4096 / max(1, lv.width)))  # strips of ≤16 M pixels of the smallest level
    for y in range(0, lv.height, rows):
        h = min(rows, lv.height - y)
        strip = reader.region(small, 0, y, lv.width, h)[::step, ::step]
        im = Image.fromarray(np.ascontiguousarray(strip)).resize(
            (max(1, round(lv.width * k)), max(1, round(h * k))), Image.Resampling.BILINEAR)
        canvas.paste(im, (0, round(y * k)))
    draw = ImageDraw.Draw(canvas)
    f = k * reader.levels[p.level].downsample / lv.downsample  # chosen-level pixels → overview pixels
    for c, r in p.chosen:
        draw.rectangle((c * PATCH * f, r * PATCH * f, (c + 1) * PATCH * f - 1, (r + 1) * PATCH * f - 1),
                       outline=(0, 160, 0), width=2)
    return np.asarray(canvas)


def _grid_overview(p: SlidePlan, size: int) -> np.ndarray:
    cols, rows = p.grid
    k = max(1, size // max(cols, rows))
    out = np.full((rows * k, cols * k, 3), 255, np.uint8)
    for c, r in p.cells:
        out[r * k:(r + 1) * k, c * k:(c + 1) * k] = (200, 160, 190)
    for c, r in p.chosen:
        out[r * k:(r + 1) * k, c * k:(c + 1) * k] = (0, 160, 0)
    return out
