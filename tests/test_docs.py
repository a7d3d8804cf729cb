"""The architecture page stays true: every file or folder it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs/architecture.md"
# A backticked repository path: `src/trimflow/layout.py`, `conf/prune/default.yaml`, `bench/`.
PATH = re.compile(r"`((?:src|conf|tests|bench|deploy|docs)/[\w./-]*)`")


def test_every_path_on_the_architecture_page_exists():
    named = PATH.findall(ARCHITECTURE.read_text())
    assert len(named) > 10
    assert [path for path in named if not (ROOT / path).exists()] == []


def test_the_readme_links_the_architecture_page():
    assert "(docs/architecture.md)" in (ROOT / "README.md").read_text()
