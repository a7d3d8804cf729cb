"""The error every data reader and check raises."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message names the file and row or column."""
