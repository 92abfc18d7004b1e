"""SHA-256 of files, read in blocks (model files are many GB; inputs are recorded by their checksum)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    sha = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            sha.update(view[:n])
    return sha.hexdigest()


def remembered_sha256(path: Path, memo: Path) -> str:
    """A model file's SHA-256, hashed once per version of the file: the answer is kept in `memo` (a JSON file)
    under the file's path with its size and modification time, and hashed again when either changes."""
    import json

    from medgemma_cli.atomic import replace_text

    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    try:
        known = json.loads(Path(memo).read_text(encoding="utf-8"))
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path))
    if isinstance(entry, list) and len(entry) == 3 and entry[:2] == stamp and isinstance(entry[2], str):
        return entry[2]
    sha = sha256_file(path)
    known[str(path)] = [*stamp, sha]
    try:
        Path(memo).parent.mkdir(parents=True, exist_ok=True)
        replace_text(Path(memo), json.dumps(known))
    except OSError:
        pass  # a read-only store: hashed again next time
    return sha
