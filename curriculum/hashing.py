"""SHA-256 of a file's bytes: what ties a stage to the adapter it started from, and a split or a replayed file to
what an earlier stage trained on. Reading data and reading adapters both use it; neither owns it."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
