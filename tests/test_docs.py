"""The architecture page stays true, and every public function in src/ says what it does."""

from __future__ import annotations

import ast
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


def undocumented(tree: ast.AST, prefix: str = "") -> list[str]:
    """Public functions and methods under `tree` without a docstring, as `Class.name`."""
    found = []
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if not node.name.startswith("_") and not ast.get_docstring(node):
                found.append(f"{prefix}{node.name}")
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            found += undocumented(node, f"{node.name}.")
    return found


def test_every_public_function_in_src_has_a_docstring():
    missing = {
        str(path.relative_to(ROOT)): names
        for path in sorted((ROOT / "src/trimflow").rglob("*.py"))
        if (names := undocumented(ast.parse(path.read_text())))
    }
    assert missing == {}
