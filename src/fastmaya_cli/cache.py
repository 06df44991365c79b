"""A content-addressed cache of generated chunks, so a rerun renders only what is missing.

Entries hold a chunk's SNAC codes (about 200 bytes a second of speech), not its audio: a whole
novel's codes take a few MB where its audio would take gigabytes. Each entry is written to a
temporary file and renamed, so a `kill -9` leaves either a whole entry or none.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .maya1 import Codes

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fastmaya"


def fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(model: str | Path) -> str:
    """Identity of a model: a hub id, or a local directory's config and weight files (name, size, mtime)."""
    path = Path(model)
    if not path.is_dir():
        return str(model)
    files = sorted(
        (p.name, p.stat().st_size, int(p.stat().st_mtime))
        for p in path.iterdir()
        if p.suffix in {".json", ".safetensors", ".bin"}
    )
    return fingerprint(str(path.resolve()), files)


@dataclass(frozen=True)
class CachedChunk:
    codes: Codes
    seed: int
    attempts: int


class ChunkCache:
    def __init__(self, directory: Path | None) -> None:
        self.directory = directory / f"chunks-v{CACHE_VERSION}" if directory else None

    def _path(self, key: str) -> Path:
        assert self.directory is not None
        return self.directory / key[:2] / f"{key}.npz"

    def get(self, key: str) -> CachedChunk | None:
        if self.directory is None:
            return None
        try:
            with np.load(self._path(key)) as data:
                codes = Codes(data["c0"], data["c1"], data["c2"])
                return CachedChunk(codes, int(data["seed"]), int(data["attempts"]))
        except (OSError, KeyError, ValueError):
            return None

    def put(self, key: str, entry: CachedChunk) -> None:
        if self.directory is None:
            return
        buffer = io.BytesIO()
        c = entry.codes
        np.savez(
            buffer,
            c0=c.c0.astype(np.int16),
            c1=c.c1.astype(np.int16),
            c2=c.c2.astype(np.int16),
            seed=entry.seed,
            attempts=entry.attempts,
        )
        atomic_write(self._path(key), buffer.getvalue())


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
