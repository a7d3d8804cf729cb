"""Stable content digests for configs and files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def digest_json(payload: Any, length: int = 12) -> str:
    """Short sha256 of a JSON-serialisable payload (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def digest_files(paths: list[Path], length: int = 12) -> str:
    """Short sha256 over the bytes of `paths`, in the given order."""
    hasher = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(block)
    return hasher.hexdigest()[:length]
