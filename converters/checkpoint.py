"""A Hugging Face checkpoint folder: its config files and its safetensors weights, opened lazily."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_cli.converters.safetensors_io import SafetensorsFile, TensorEntry, to_float32
from medgemma_cli.errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise InputError(path, "missing (is this a Hugging Face checkpoint folder?)")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e})") from e
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from e
    if not isinstance(data, dict):
        raise InputError(path, "expected a JSON object")
    return data


class Checkpoint:
    """Config + tensor index of a checkpoint folder. Tensor data is read only when asked for, in row ranges."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(self.folder, "not a folder (expected a Hugging Face checkpoint folder)")
        self.config_path = self.folder / "config.json"
        self.config = read_json(self.config_path)
        self.config_sha256 = hashlib.sha256(self.config_path.read_bytes()).hexdigest()
        self.processor_config = {
            **read_json(self.folder / "preprocessor_config.json", required=False),
            **read_json(self.folder / "processor_config.json", required=False),
        }
        self.files: dict[Path, SafetensorsFile] = {}
        self.entries: dict[str, TensorEntry] = {}
        self._open_weights()

    def _weight_files(self) -> list[Path]:
        index_path = self.folder / "model.safetensors.index.json"
        if index_path.is_file():
            index = read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise InputError(index_path, "has no weight_map")
            names = sorted(set(weight_map.values()))
            for n in names:
                if not isinstance(n, str) or Path(n).name != n or n in (".", "..") or not n.endswith(".safetensors"):
                    # a shard is a .safetensors file beside the index, never a path elsewhere (../../etc/passwd)
                    raise InputError(index_path, f"names a shard outside the checkpoint folder: {str(n)[:80]!r}")
                if not (self.folder / n).is_file():
                    raise InputError(self.folder / n, f"missing (listed in {index_path.name})")
            self._index: dict[str, str] | None = weight_map
            return [self.folder / n for n in names]
        self._index = None
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            return files
        pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise InputError(
                self.folder / pickles[0],
                "pickle-based PyTorch weights are refused: loading them can run arbitrary code and needs torch; "
                "use the checkpoint's .safetensors files (every MedGemma release has them)",
            )
        raise InputError(self.folder, "no *.safetensors weights found")

    def _open_weights(self) -> None:
        for path in self._weight_files():
            f = SafetensorsFile(path)
            self.files[path] = f
            for name, entry in f.entries.items():
                if name in self.entries:
                    raise InputError(path, f"tensor {name!r} also appears in {self.entries[name].path.name}")
                self.entries[name] = entry
        if self._index is not None:
            for name, fname in self._index.items():
                if name not in self.entries:
                    raise InputError(self.folder / fname, f"tensor {name!r} listed in the index is not in the file")

    def read_rows(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Stored values (bf16 as uint16 bits) of a tensor or of some of its first-axis rows."""
        entry = self.entries[name]
        return self.files[entry.path].read(name, rows)

    def read_f32(self, name: str, rows: slice | None = None) -> np.ndarray:
        return to_float32(self.read_rows(name, rows), self.entries[name].dtype)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
