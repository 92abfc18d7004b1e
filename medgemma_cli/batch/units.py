"""A batch's units: files grouped into series, studies or single files, and the keyed ids records carry."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgemma_cli.atomic import replace_text
from medgemma_cli.defaults import MAX_PATCHES
from medgemma_cli.errors import InputError, MedgemmaError
from medgemma_cli.inputs import dicom
from medgemma_cli.inputs.slides import WSI_SOP_CLASS
from medgemma_cli.inputs.walk import kind_of

UNIT_KINDS = ("series", "study", "file")
PHI_TAGS = ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "AccessionNumber", "InstitutionName")


@dataclass
class Unit:
    id: str
    kind: str
    files: list[Path]
    modality: str = ""
    phi: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # a unit that cannot even be grouped (unreadable header)
    # for --with-prior only, never written out: who the patient is, when the study was made, what of
    patient: str = ""
    taken: str = ""  # StudyDate + StudyTime, sortable
    body_part: str = ""
    prior: Unit | None = None  # the same patient's most recent earlier chest X-ray study in the folder
    images: int = 1  # frames in all its files, before any sampling: what sizes the context a batch needs


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]  # names need not be UTF-8


def make_units(folder: Path, files: list[Path], unit: str = "series") -> list[Unit]:
    """Files grouped into units. A file unit is one file (two copies of one SOP instance are two units: a bad
    copy must not fail its good twin). A header that cannot be read makes that file a unit of its own, in
    error, and grouping goes on."""
    if unit not in UNIT_KINDS:
        raise MedgemmaError(f"unknown unit {unit!r}; choose one of {', '.join(UNIT_KINDS)}")
    units: dict[str, Unit] = {}
    for f in files:
        rel = str(f.relative_to(folder))
        is_dicom = kind_of(f) == "dicom"
        if not is_dicom and unit != "file":
            units.setdefault(short_hash(rel), Unit(short_hash(rel), "file", [f]))
            continue
        try:
            ds = dicom.read(f, pixels=False) if is_dicom else None
            frames = (dicom.integer(ds, "NumberOfFrames") or 1) if ds is not None else 1
        except InputError as e:
            units[short_hash(rel)] = Unit(short_hash(rel), unit, [f], error=e.problem)
            continue
        except ValueError as e:  # a frame count that is no count: the unit fails here, named, and the batch goes on
            units[short_hash(rel)] = Unit(short_hash(rel), unit, [f], error=str(e))
            continue
        modality = str(ds.get("Modality", "") or "") if ds is not None else ""
        slide = ds is not None and str(ds.get("SOPClassUID", "")) == WSI_SOP_CLASS  # levels of one image: one unit
        if slide:
            frames = MAX_PATCHES  # tiles, not images: what the context is sized for is the patches sent
        if unit == "file" and not slide:
            units[short_hash(rel)] = Unit(short_hash(rel), "file", [f], modality, images=frames)
            continue
        assert ds is not None  # a file that is not DICOM is a unit of its own (above)
        key = "StudyInstanceUID" if unit == "study" else "SeriesInstanceUID"
        uid = str(ds.get(key, "") or "") or short_hash(rel)
        u = units.setdefault(uid, Unit(uid, unit, [], modality,
                                       {t: str(ds.get(t)) for t in PHI_TAGS if ds.get(t) not in (None, "")},
                                       patient=_patient(ds), taken=_taken(ds),
                                       body_part=str(ds.get("BodyPartExamined", "") or "").strip().upper(),
                                       images=0))
        u.files.append(f)
        u.images += frames
    return list(units.values())


def _patient(ds: Any) -> str:
    """The patient, as far as the header says: the ID (with its issuer), else name and birth date; "" if neither."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if pid:
        return "id:" + pid + "|" + str(ds.get("IssuerOfPatientID", "") or "").strip()
    name, born = str(ds.get("PatientName", "") or "").strip(), str(ds.get("PatientBirthDate", "") or "").strip()
    return f"name:{name}|{born}" if name and born else ""


def _taken(ds: Any) -> str:
    date = str(ds.get("StudyDate", "") or "").strip()
    time = str(ds.get("StudyTime", "") or "").strip().split(".")[0]
    return f"{date}{time.ljust(6, '0')}" if len(date) == 8 and date.isdigit() else ""


CHEST_XRAY_MODALITIES = ("CR", "DX")


def pair_priors(units: list[Unit]) -> int:
    """Give each chest X-ray study the same patient's most recent earlier one (strictly earlier date and time) as
    its prior; studies without a patient identifier or a date get none. Returns how many were paired."""
    def chest_xray(u: Unit) -> bool:
        return (u.kind == "study" and not u.error and u.modality in CHEST_XRAY_MODALITIES
                and u.body_part in ("", "CHEST") and bool(u.patient) and bool(u.taken))

    by_patient: dict[str, list[Unit]] = {}
    for u in units:
        if chest_xray(u):
            by_patient.setdefault(u.patient, []).append(u)
    paired = 0
    for studies in by_patient.values():
        studies.sort(key=lambda u: u.taken)
        for earlier, later in itertools.pairwise(studies):
            if earlier.taken < later.taken:
                later.prior = earlier
                paired += 1
            else:  # made at the same time: neither is the other's prior; the earlier one's prior is this one's too
                later.prior = earlier.prior
                paired += later.prior is not None
    return paired


def unit_id_key(out: Path, has_records: bool = False) -> bytes:
    """The secret behind one results file's unit ids, kept beside it (`<out>.unit-key`, owner-only): stable, so a
    resumed run finds its records; the site can map its own UIDs to ids with it; nobody else can."""
    path = unit_key_path(out)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if has_records:  # ids made without this key: every unit would be redone and recorded twice
            raise InputError(path, f"missing, but {Path(out).name} already holds records (from an older "
                                   "medgemma-cli, or --include-phi?); restore the key or choose another --out"
                             ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read the unit-id key ({e}); restore it or choose another --out") from None
    else:
        try:
            if len(text) == 64:
                return bytes.fromhex(text)
        except ValueError:
            pass
        raise InputError(path, "not a unit-id key (64 hex digits); restore it or choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(32)
    replace_text(path, key.hex() + "\n", mode=0o600)
    return key


def pseudonym(key: bytes, unit_id: str) -> str:
    """HMAC-SHA256 of a unit id (a DICOM UID, or a hash of a relative path), shortened: no UID, date or device
    serial inside it leaves the site."""
    return "u" + hmac.new(key, unit_id.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:24]


def unit_key_path(results: Path) -> Path:
    return Path(results).with_name(Path(results).name + ".unit-key")
