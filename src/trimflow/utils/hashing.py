"""Stable content digests for configs."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def digest_json(payload: Any, length: int = 12) -> str:
    """Short sha256 of a JSON-serialisable payload (key order does not matter)."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
