"""The local model store: converted models under one folder, each described by its manifest.json."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def home() -> Path:
    """MEDGEMMA_HOME if set, else the platform's per-user data folder."""
    env = os.environ.get("MEDGEMMA_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("medgemma", appauthor=False))


def models_dir() -> Path:
    return home() / "models"


def cache_dir() -> Path:
    return home() / "cache"


@dataclass(frozen=True)
class StoredModel:
    name: str
    path: Path
    manifest: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "?"))

    @property
    def size(self) -> int:
        return sum(int(f.get("size", 0)) for f in self.manifest.get("files", {}).values())


def list_models(root: Path | None = None) -> list[StoredModel]:
    """Every converted model in the store (folders with a readable manifest.json), sorted by name."""
    from medgemma_cli.errors import InputError

    root = root or models_dir()
    out = []
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            try:
                out.append(StoredModel(d.name, d, read_manifest(d)))
            except InputError:
                continue  # not a model: `damaged_entries` says why
    return out


def damaged_entries(root: Path | None = None) -> list[tuple[Path, str]]:
    """Store folders that are not (or no longer) models, and why: for a warning, never a failure."""
    root = root or models_dir()
    found = []
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            try:
                read_manifest(d)
            except Exception as e:  # noqa: BLE001 - each entry is reported, none stops the listing
                found.append((d, getattr(e, "problem", str(e))))
            for p in leftovers(d):
                found.append((p, "left by a conversion that was killed; removed by the next convert into this folder"))
    return found


def newest(kind: str, how_to_convert: str) -> Path:
    """The most recently converted model of a kind (gguf, onnx-siglip), or a message saying how to make one."""
    from medgemma_cli.errors import MedgemmaError

    found = [m for m in list_models() if m.kind == kind]
    if not found:
        raise MedgemmaError(f"no converted {how_to_convert} model in {models_dir()}: convert one with "
                            f"`medgemma convert CHECKPOINT_DIR`, or pass --model DIR")
    found.sort(key=lambda m: (m.path / "manifest.json").stat().st_mtime)
    return found[-1].path


# --- integrity: the manifest is the commit point ------------------------------------------------------------

MANIFEST = "manifest.json"
VERIFIED = ".verified.json"  # (size, mtime) of each file when its SHA-256 last matched the manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """A model folder's manifest; a folder without a complete one is not a model (a conversion did not finish)."""
    from medgemma_cli.errors import InputError

    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise InputError(folder, "not a complete model: no manifest.json (a conversion did not finish?); "
                                 "convert again")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"unreadable ({type(e).__name__}); convert again") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or not all(isinstance(v, dict) for v in files.values()):
        raise InputError(path, "not a medgemma-cli manifest (no list of files); convert again")
    return manifest


def _expected(manifest: dict[str, Any]) -> dict[str, tuple[int, str | None]]:
    """file name -> (size, sha256 or None) for every file the manifest vouches for."""
    out: dict[str, tuple[int, str | None]] = {}
    for name, entry in manifest["files"].items():
        if Path(name).name != name:
            continue  # a manifest names files in its own folder only
        out[name] = (int(entry.get("size", -1)), entry.get("sha256"))
        if "data_size" in entry:
            out[name + ".data"] = (int(entry["data_size"]), None)
    return out


def verified_manifest(folder: Path, kind: str, what: str) -> dict[str, Any]:
    """The manifest of a model folder of `kind`, after its files were checked (what every load goes through)."""
    from medgemma_cli.errors import InputError

    manifest = read_manifest(folder)  # none: a conversion that did not finish
    if manifest.get("kind") != kind:
        raise InputError(folder, f"a {manifest.get('kind', 'unknown')} model, not {what}")
    check_files(folder, manifest)
    return manifest


def verify_models(models: list[StoredModel]) -> dict[str, str]:
    """`medgemma models --verify`: every file's SHA-256, now; the damaged models by name, with the problem."""
    from medgemma_cli.errors import MedgemmaError

    problems = {}
    for m in models:
        try:
            check_files(m.path, m.manifest, full=True)
        except MedgemmaError as e:
            problems[m.name] = str(e)
    return problems


def check_files(folder: Path, manifest: dict[str, Any], full: bool = False) -> list[str]:
    """Every file the manifest lists is there with its size (always) and its SHA-256 (when the file changed since
    it last matched, or `full`). Returns the names whose checksum was computed; raises on the first problem."""
    from medgemma_cli.checksums import sha256_file
    from medgemma_cli.errors import InputError

    folder = Path(folder)
    verified_path = folder / VERIFIED
    try:
        verified = json.loads(verified_path.read_text(encoding="utf-8"))
        verified = verified if isinstance(verified, dict) else {}
    except (OSError, ValueError):
        verified = {}
    hashed = []
    for name, (size, sha) in _expected(manifest).items():
        path = folder / name
        try:
            st = path.stat()
        except OSError:
            raise InputError(path, "missing (listed in manifest.json): the model is incomplete; convert again"
                             ) from None
        if st.st_size != size:
            raise InputError(path, f"{st.st_size} bytes where manifest.json says {size}: damaged or replaced; "
                                   "convert again")
        if sha is None:
            continue
        stamp = [st.st_size, st.st_mtime_ns, sha]
        if not full and verified.get(name) == stamp:
            continue
        if sha256_file(path) != sha:
            raise InputError(path, "does not match its SHA-256 in manifest.json: damaged since it was converted; "
                                   "convert again")
        verified[name] = stamp
        hashed.append(name)
    if hashed:
        _write_verified(folder, verified)
    return hashed


def remember_verified(folder: Path, manifest: dict[str, Any]) -> None:
    """After a conversion, whose hashes were just computed: the first load need not hash the files again."""
    folder = Path(folder)
    verified = {}
    for name, (_size, sha) in _expected(manifest).items():
        if sha is not None and (folder / name).is_file():
            st = (folder / name).stat()
            verified[name] = [st.st_size, st.st_mtime_ns, sha]
    _write_verified(folder, verified)


def _write_verified(folder: Path, verified: dict[str, Any]) -> None:
    from medgemma_cli.atomic import replace_text

    try:
        replace_text(Path(folder) / VERIFIED, json.dumps(verified))
    except OSError:
        pass  # a read-only store: the files are hashed again next time


def leftovers(folder: Path) -> list[Path]:
    """Temporary files of conversions whose process is gone (killed mid-way): `.NAME.partial-PID`."""
    import re

    out: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return out
    for p in entries:
        m = re.fullmatch(r"\..+\.(?:partial|scratch)-(\d+)", p.name)
        if m and not _alive(int(m.group(1))):
            out.append(p)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
