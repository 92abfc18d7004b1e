"""Synthetic whole slides for the tests and the benchmark: tissue boxes drawn on white glass, as a DICOM VL Whole
Slide Microscopy pyramid (TILED_FULL or TILED_SPARSE, one instance per level) or a tiled pyramidal TIFF.

Pixels come from one function of level-0 coordinates (`pixels`), so a test can compute what any patch at any
level must hold. Tiles are written one at a time, and DICOM pixel data is streamed to the file, so a 100,000 ×
80,000 px slide is made with little memory (solid tiles are encoded once and reused)."""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in level-0 pixels
TISSUE = (200, 120, 170)  # mean grey ≈ 0.59: tissue by the recipe's luminance rule
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def pixels(xs: np.ndarray, ys: np.ndarray, tissue: Sequence[Box], texture: bool = True) -> np.ndarray:
    """RGB uint8 at level-0 coordinates (2-D arrays): white, or tissue inside a box (with a texture that tells
    places apart, unless `texture` is off: solid tiles compress to one reusable frame)."""
    inside = np.zeros(xs.shape, bool)
    for x0, y0, x1, y1 in tissue:
        inside |= (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    out = np.full((*xs.shape, 3), 255, np.uint8)
    rgb = np.empty((*xs.shape, 3), np.uint8)
    rgb[...] = TISSUE
    if texture:
        rgb[..., 0] = 150 + (xs // 97) % 80
        rgb[..., 2] = 130 + (ys // 89) % 80
    out[inside] = rgb[inside]
    return out


def region(level_downsample: int, x: int, y: int, w: int, h: int, tissue: Sequence[Box],
           texture: bool = True) -> np.ndarray:
    """What a reader must return for a region of a level (pixel centres sampled at level 0)."""
    d = level_downsample
    ys, xs = np.mgrid[y:y + h, x:x + w]
    return pixels(xs * d + d // 2, ys * d + d // 2, tissue, texture)


def _tile_kind(x0: int, y0: int, x1: int, y1: int, tissue: Sequence[Box]) -> str:
    """'glass', 'solid' (inside one box) or 'mixed', for level-0 bounds."""
    touching = [b for b in tissue if b[0] < x1 and x0 < b[2] and b[1] < y1 and y0 < b[3]]
    if not touching:
        return "glass"
    if any(b[0] <= x0 and b[1] <= y0 and x1 <= b[2] and y1 <= b[3] for b in touching):
        return "solid"
    return "mixed"


def _jpeg(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_dicom_wsi(folder: Path, width: int, height: int, tissue: Sequence[Box], *,
                    downsamples: Sequence[int] = (1, 4, 16), tile: int = 256, mpp: float = 0.25,
                    sparse: bool = False, jpeg: bool = False, texture: bool = True, label: bool = True,
                    patient_name: str = "Doe^Jane") -> list[Path]:
    """One series: an instance per level (level k is level 0 divided by downsamples[k]), plus a LABEL image the
    reader must never use. Returns the files written."""
    from medgemma_cli.offline import import_pydicom

    pydicom = import_pydicom()
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    written = []
    for k, d in enumerate(downsamples):
        w, h = -(-width // d), -(-height // d)
        across, down = -(-w // tile), -(-h // tile)
        frames: list[tuple[int, int]] = []
        for ty in range(down):
            for tx in range(across):
                kind = _tile_kind(tx * tile * d, ty * tile * d, (tx + 1) * tile * d, (ty + 1) * tile * d, tissue)
                if sparse and kind == "glass":
                    continue
                frames.append((tx, ty))
        ds = _slide_instance(study, series, patient_name,
                             ["ORIGINAL" if k == 0 else "DERIVED", "PRIMARY", "VOLUME",
                              "NONE" if k == 0 else "RESAMPLED"],
                             (tile, tile), (w, h), len(frames), "YBR_FULL_422" if jpeg else "RGB",
                             "TILED_SPARSE" if sparse else "TILED_FULL")
        ds.PatientID = "PID-0001"
        ds.InstanceNumber = k + 1
        ds.TotalPixelMatrixFocalPlanes = 1
        measures = Dataset()
        measures.PixelSpacing = [mpp * d / 1000.0, mpp * d / 1000.0]
        measures.SliceThickness = 0.004
        shared = Dataset()
        shared.PixelMeasuresSequence = Seq([measures])
        ds.SharedFunctionalGroupsSequence = Seq([shared])
        if sparse:
            per = []
            for tx, ty in frames:
                pos = Dataset()
                pos.ColumnPositionInTotalImagePixelMatrix = tx * tile + 1
                pos.RowPositionInTotalImagePixelMatrix = ty * tile + 1
                pos.XOffsetInSlideCoordinateSystem = 0.0
                pos.YOffsetInSlideCoordinateSystem = 0.0
                pos.ZOffsetInSlideCoordinateSystem = 0.0
                item = Dataset()
                item.PlanePositionSlideSequence = Seq([pos])
                per.append(item)
            ds.PerFrameFunctionalGroupsSequence = Seq(per)
        _add_file_meta(ds, JPEG_BASELINE if jpeg else EXPLICIT_LE)
        path = folder / f"level-{k}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        with open(path, "ab") as f:
            _append_pixels(f, frames, lambda tx, ty, d=d, w=w, h=h: _tile_pixels(tx, ty, d, w, h, tile, tissue,
                                                                                  texture),
                           lambda tx, ty, d=d: _tile_kind(tx * tile * d, ty * tile * d, (tx + 1) * tile * d,
                                                          (ty + 1) * tile * d, tissue),
                           jpeg, texture)
        written.append(path)
    if label:
        written.append(_write_label(folder / "label.dcm", study, series, patient_name))
    return written


def _tile_pixels(tx: int, ty: int, d: int, w: int, h: int, tile: int, tissue: Sequence[Box],
                 texture: bool) -> np.ndarray:
    out = region(d, tx * tile, ty * tile, tile, tile, tissue, texture)
    # beyond the level's edge the tile is padded (white), as scanners do
    out[max(0, h - ty * tile):, :] = 255
    out[:, max(0, w - tx * tile):] = 255
    return out


def _append_pixels(f, frames, tile_of, kind_of, jpeg: bool, texture: bool) -> None:
    """The pixel data element, streamed after the header: native frames one after another, or encapsulated
    fragments (one per frame, empty basic offset table)."""
    if not jpeg:
        length = 0
        first = tile_of(*frames[0]) if frames else None
        length = (first.nbytes if first is not None else 0) * len(frames)
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, length + (length % 2)))
        for tx, ty in frames:
            f.write(tile_of(tx, ty).tobytes())
        if length % 2:
            f.write(b"\0")
        return
    f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
    f.write(struct.pack("<II", 0xE000FFFE, 0))
    reuse: dict[str, bytes] = {}
    for tx, ty in frames:
        kind = kind_of(tx, ty)
        key = kind if kind == "glass" or (kind == "solid" and not texture) else None
        data = reuse.get(key) if key else None
        if data is None:
            data = _jpeg(tile_of(tx, ty))
            if len(data) % 2:
                data += b"\0"
            if key:
                reuse[key] = data
        f.write(struct.pack("<II", 0xE000FFFE, len(data)))
        f.write(data)
    f.write(struct.pack("<II", 0xE0DDFFFE, 0))


def _slide_instance(study: str, series: str, patient_name: str, image_type: list[str], tile: tuple[int, int],
                    total: tuple[int, int], frames: int, photometric: str, organization: str) -> Any:
    """The attributes every instance of a synthetic slide series shares: a VL Whole Slide Microscopy image of 8-bit
    colour tiles (`tile` and `total` as (columns, rows))."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.6"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "SM"
    ds.PatientName = patient_name
    ds.ImageType = image_type
    ds.Columns, ds.Rows = tile
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = total
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.DimensionOrganizationType = organization
    return ds


def _add_file_meta(ds: Any, transfer_syntax: str) -> None:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta = meta


def _write_label(path: Path, study: str, series: str, patient_name: str) -> Path:
    """A slide label (it would show the patient's name): part of the series, never sent to the model."""
    from medgemma_cli.offline import import_pydicom

    pydicom = import_pydicom()
    ds = _slide_instance(study, series, patient_name, ["ORIGINAL", "PRIMARY", "LABEL", "NONE"], (128, 64), (128, 64),
                         1, "RGB", "TILED_FULL")
    ds.PixelData = np.zeros((64, 128, 3), np.uint8).tobytes()
    _add_file_meta(ds, EXPLICIT_LE)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def write_pyramidal_tiff(path: Path, width: int, height: int, tissue: Sequence[Box], *,
                         downsamples: Sequence[int] = (1, 4, 16), tile: int = 256, mpp: float = 0.25,
                         texture: bool = True) -> Path:
    """A tiled pyramidal TIFF (OpenSlide's generic-tiff) with its resolution in pixels per centimetre, written
    tile by tile (tifffile, a test and benchmark dependency)."""
    import tifffile

    def tiles(d: int, w: int, h: int):
        for ty in range(-(-h // tile)):
            for tx in range(-(-w // tile)):
                yield _tile_pixels(tx, ty, d, w, h, tile, tissue, texture)

    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**31) as tw:
        for k, d in enumerate(downsamples):
            w, h = -(-width // d), -(-height // d)
            per_cm = 1e4 / (mpp * d)
            tw.write(tiles(d, w, h), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression="zlib", resolution=(per_cm, per_cm), resolutionunit="CENTIMETER",
                     subfiletype=0 if k == 0 else 1)
    return Path(path)
