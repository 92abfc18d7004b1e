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
    root = root or models_dir()
    out = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            m = d / "manifest.json"
            if m.is_file():
                try:
                    out.append(StoredModel(d.name, d, json.loads(m.read_text(encoding="utf-8"))))
                except (OSError, json.JSONDecodeError):
                    continue
    return out


def newest(kind: str, how_to_convert: str) -> Path:
    """The most recently converted model of a kind (gguf, onnx-siglip), or a message saying how to make one."""
    from medgemma_cli.errors import MedgemmaError

    found = [m for m in list_models() if m.kind == kind]
    if not found:
        raise MedgemmaError(f"no converted {how_to_convert} model in {models_dir()}: convert one with "
                            f"`medgemma convert CHECKPOINT_DIR`, or pass --model DIR")
    found.sort(key=lambda m: (m.path / "manifest.json").stat().st_mtime)
    return found[-1].path
