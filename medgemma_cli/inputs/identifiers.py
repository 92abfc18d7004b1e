"""The patient's own identifiers, read from the DICOM headers of the study, removed from the free text we send.

Structured-report text and notes given with a study can name the patient, their IDs and birth date, the
physicians and the institution. The headers of the same study say exactly which strings those are, so each
occurrence (names in their components and usual orders, dates in the usual written forms, case-insensitive,
whole words) becomes a placeholder. This removes the identifiers we know; it is not general de-identification
of free text: a name or date the headers do not carry stays.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydicom import Dataset

NAME_TAGS = ("PatientName", "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
             "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician", "PatientMotherBirthName")
ID_TAGS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "IssuerOfPatientID", "MedicalRecordLocator")
DATE_TAGS = ("PatientBirthDate",)
PLACE_TAGS = ("InstitutionName", "InstitutionAddress")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
MIN_LENGTH = 3  # shorter strings ("Al", "CT", "12") are words and numbers of clinical text far more often
PARTICLES = {"de", "la", "le", "el", "al", "da", "di", "du", "del", "der", "den", "van", "von", "ten", "ter", "bin",
             "ibn", "bint", "mac", "st", "dos", "das", "des", "y", "e"}


@dataclass
class Identifiers:
    """Strings to replace, by the placeholder they become."""

    found: dict[str, set[str]] = field(default_factory=lambda: {"[NAME]": set(), "[ID]": set(), "[DATE]": set(),
                                                                    "[INSTITUTION]": set()})
    # one-word name parts are matched only as names are written (Capitalised or UPPER CASE): "White^Al" must not
    # turn "white matter" into "[NAME] matter"
    name_words: set[str] = field(default_factory=set)

    def add_dataset(self, ds: Dataset) -> None:
        for tag in NAME_TAGS:
            for value in _values(ds.get(tag)):
                for form in name_forms(str(value)):
                    if " " in form or "^" in form or "," in form:
                        self.found["[NAME]"].add(form)
                    elif form.lower() not in PARTICLES:
                        self.name_words.add(form)
        for tag in ID_TAGS:
            self.found["[ID]"].update(str(v).strip() for v in _values(ds.get(tag)))
        for item in ds.get("OtherPatientIDsSequence") or []:
            self.found["[ID]"].update(str(v).strip() for v in _values(item.get("PatientID")))
        for tag in DATE_TAGS:
            for value in _values(ds.get(tag)):
                self.found["[DATE]"].update(date_forms(str(value)))
        for tag in PLACE_TAGS:
            self.found["[INSTITUTION]"].update(str(v).strip() for v in _values(ds.get(tag)))

    def __bool__(self) -> bool:
        return any(self.found.values()) or bool(self.name_words)

    def scrub(self, text: str) -> tuple[str, int]:
        """`text` with every known identifier replaced, and how many were."""
        total = 0
        for placeholder, strings in self.found.items():  # whole names first: "Jane Doe" before "Doe"
            usable = sorted({s for s in strings if _usable(s, placeholder)}, key=len, reverse=True)
            if usable:
                text, n = _pattern(usable, re.IGNORECASE).subn(placeholder, text)
                total += n
        words = sorted({w for part in self.name_words if len(part) >= MIN_LENGTH
                        for w in (part[:1].upper() + part[1:].lower(), part.upper(), part)}, key=len, reverse=True)
        if words:
            text, n = _pattern(words, 0).subn("[NAME]", text)
            total += n
        return text, total


def _usable(s: str, placeholder: str) -> bool:
    if len(s) < MIN_LENGTH:
        return False
    if placeholder == "[ID]":  # short IDs must look like IDs (letters and digits), or they hit measurements
        return len(s) >= 4 or (any(c.isdigit() for c in s) and any(c.isalpha() for c in s))
    return True


def _pattern(literals: list[str], flags: int) -> re.Pattern[str]:
    return re.compile(r"(?<![\w])(?:" + "|".join(_loose(s) for s in literals) + r")(?![\w])", flags)


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [v for v in value if v not in (None, "")]
    return [value]


def _loose(s: str) -> str:
    """A literal whose inner spaces match any run of white space (notes wrap lines)."""
    return r"\s+".join(re.escape(part) for part in s.split())


def name_forms(pn: str) -> set[str]:
    """A DICOM person name (Family^Given^Middle^Prefix^Suffix) as people write it, and its parts."""
    parts = [p.strip() for p in pn.split("=")[0].split("^")]
    parts += [""] * (4 - len(parts))
    family, given, middle, prefix = parts[:4]
    forms = {pn.split("=")[0].strip()}
    for a, b in ((given, family), (family, given)):
        if a and b:
            forms |= {f"{a} {b}", f"{family}, {given}"}
    if given and middle and family:
        forms |= {f"{given} {middle} {family}", f"{family}, {given} {middle}", f"{given} {middle[0]}. {family}",
                  f"{given} {middle[0]} {family}", f"{family}, {given} {middle[0]}.", f"{family}, {given} {middle[0]}"}
    if prefix and family:
        forms |= {f"{prefix} {family}", f"{prefix} {given} {family}".replace("  ", " ")}
    for piece in (family, given, middle):  # each part alone, and each word of a multi-word part
        forms.add(piece)
        forms |= set(piece.replace("-", " ").split())
    return {f.strip() for f in forms if f.strip()}


def date_forms(da: str) -> set[str]:
    """A DICOM date (YYYYMMDD) in the ways it is commonly written."""
    da = da.strip()
    if not re.fullmatch(r"\d{8}", da):
        return {da} if da else set()
    y, m, d = da[:4], da[4:6], da[6:]
    mi, di = str(int(m)), str(int(d))
    if not (1 <= int(m) <= 12):
        return {da}
    month = MONTHS[int(m) - 1]
    forms = {da, f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{y}.{m}.{d}"}
    for dd, mm in ((d, m), (di, mi)):
        for sep in ("/", "-", "."):
            forms |= {f"{dd}{sep}{mm}{sep}{y}", f"{mm}{sep}{dd}{sep}{y}", f"{dd}{sep}{mm}{sep}{y[2:]}",
                      f"{mm}{sep}{dd}{sep}{y[2:]}"}
    for name in (month, month[:3], month[:3] + "."):
        for day in (di, d):
            forms |= {f"{day} {name} {y}", f"{name} {day}, {y}", f"{name} {day} {y}", f"{day}-{name}-{y}"}
    return forms


def from_datasets(datasets: Iterable[Any]) -> Identifiers:
    ids = Identifiers()
    for ds in datasets:
        ids.add_dataset(ds)
    return ids
