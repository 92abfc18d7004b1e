"""A bounded, self-checking cache of files in the model store: image embeddings and prompt states.

Every entry is a data file and, beside it, a `.sum` file (its SHA-256 and size) written last: an entry without a
sum, with a sum that does not match, or cut short, is a miss, removed and written again. Reads hash the file as
they go (a 300 MB prompt state hashes in a fraction of the time it saves), so nothing damaged reaches the model.
Entries are used least-recently-first out of the cache when the whole cache folder would exceed its bound.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medgemma_cli.atomic import replace_text, replacing
from medgemma_cli.checksums import sha256_file

GB = 1 << 30
_KEY = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CacheUsage:
    entries: int
    bytes: int


def cache_key(*parts: bytes | str) -> str:
    """SHA-256 over length-prefixed parts, so that no two different part lists give one key."""
    sha = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogateescape") if isinstance(part, str) else bytes(part)
        sha.update(len(data).to_bytes(8, "little"))
        sha.update(data)
    return sha.hexdigest()


class DiskCache:
    """Entries under `root/<kind>/`, the whole of `root` kept under `max_bytes`."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = Path(root), int(max_bytes)

    def _paths(self, kind: str, key: str) -> tuple[Path, Path]:
        if not _KEY.fullmatch(key) or not kind.isidentifier():
            raise ValueError(f"not a cache key: {kind}/{key}")
        data = self.root / kind / key
        return data, data.with_name(key + ".sum")

    def get(self, kind: str, key: str) -> Path | None:
        """The entry's file, checked whole against its sum, or None (a damaged entry is removed)."""
        data, summary = self._paths(kind, key)
        try:
            sha, size = summary.read_text(encoding="ascii").split()
            if data.stat().st_size != int(size) or sha256_file(data) != sha:
                raise ValueError("damaged")
        except FileNotFoundError:
            if data.exists() or summary.exists():
                self._remove(data, summary)  # half an entry: a writer was killed between the two renames
            return None
        except (OSError, ValueError):
            self._remove(data, summary)
            return None
        os.utime(summary)  # the sum's modification time is the entry's last use (atime is often not kept)
        return data

    def contains(self, kind: str, key: str) -> bool:
        """Whether an entry is there (unchecked: for estimates, not for use)."""
        data, summary = self._paths(kind, key)
        return data.is_file() and summary.is_file()

    def put(self, kind: str, key: str, write: Callable[[Path], object]) -> Path | None:
        """Store what `write(path)` writes; None when it is larger than the whole cache may be."""
        data, summary = self._paths(kind, key)
        data.parent.mkdir(parents=True, exist_ok=True)
        try:
            with replacing(data) as tmp:
                write(tmp)
                size = tmp.stat().st_size
                if size > self.max_bytes:
                    raise _TooLarge
                sha = sha256_file(tmp)
        except _TooLarge:
            return None
        replace_text(summary, f"{sha} {size}\n")  # the commit point: an entry counts once its sum is there
        self.evict()
        return data

    def put_bytes(self, kind: str, key: str, payload: bytes) -> Path | None:
        return self.put(kind, key, lambda p: p.write_bytes(payload))

    def usage(self) -> CacheUsage:
        entries = self._entries()
        return CacheUsage(len(entries), sum(size for _, size, _ in entries))

    def evict(self) -> None:
        """Drop the least recently used entries until the cache fits its bound."""
        entries = sorted(self._entries(), key=lambda e: e[2])
        total = sum(size for _, size, _ in entries)
        for data, size, _ in entries:
            if total <= self.max_bytes:
                break
            self._remove(data, data.with_name(data.name + ".sum"))
            total -= size

    def clear(self) -> CacheUsage:
        before = self.usage()
        for data, _, _ in self._entries():
            self._remove(data, data.with_name(data.name + ".sum"))
        for path in self.root.glob("*/.*.partial-*"):  # writers killed mid-entry
            path.unlink(missing_ok=True)
        return before

    def _entries(self) -> list[tuple[Path, int, float]]:
        """(data file, bytes with its sum, last use) of every entry."""
        out = []
        for summary in self.root.glob("*/*.sum"):
            data = summary.with_suffix("")
            try:
                out.append((data, data.stat().st_size + summary.stat().st_size, summary.stat().st_mtime))
            except OSError:
                continue
        return out

    @staticmethod
    def _remove(*paths: Path) -> None:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass



class _TooLarge(Exception):
    pass
