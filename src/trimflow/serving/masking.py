"""Mask personal data in logged texts: each match of a configured pattern becomes `<name>`.

The patterns are `serve.prediction_log.mask` (name -> regular expression), applied in their
order: e-mail addresses before phone numbers before digit runs, so that the digits of an
address or a number are masked as a whole, once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping


class Masker:
    """`masker(text)`: `text` with every match of each pattern replaced by `<its name>`."""

    def __init__(self, patterns: Mapping[str, str | None]) -> None:
        self.patterns = [
            (re.compile(pattern), f"<{name}>")
            for name, pattern in patterns.items()
            if pattern is not None
        ]

    def __call__(self, text: str) -> str:
        for pattern, replacement in self.patterns:
            text = pattern.sub(replacement, text)
        return text
