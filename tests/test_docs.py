"""The README and the documentation stay true: every repository path they name exists, every
link between them resolves, every command of the README exists and its config overrides
validate, and every public function in src/ says what it does."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
ARCHITECTURE = ROOT / "docs/architecture.md"
# Every page of the site, the generated references included (they name schema and CLI paths).
PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_hooks" not in p.parts)
# A backticked repository path: `src/trimflow/layout.py`, `conf/prune/default.yaml`, `bench/`.
PATH = re.compile(r"`((?:src|conf|tests|bench|deploy|docs)/[\w./-]*)`")
# A markdown link or image target: [text](target) or ![alt](target).
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# MLflow metric names that read like paths under bench/ (docs/how-to/tracking.md).
METRIC = re.compile(r"bench/(latency\w*|throughput\w*)\*?")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
README_MAX_LINES = 250


def _missing_paths(page: Path) -> list[str]:
    named = [path for path in PATH.findall(page.read_text()) if not METRIC.fullmatch(path)]
    return [path for path in named if not (ROOT / path).exists()]


def test_every_path_on_the_architecture_page_exists():
    named = PATH.findall(ARCHITECTURE.read_text())
    assert len(named) > 10
    assert _missing_paths(ARCHITECTURE) == []


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_path_the_readme_and_the_docs_name_exists(page):
    assert _missing_paths(page) == []


def test_the_docs_have_the_pages_the_readme_promises():
    names = {str(p.relative_to(ROOT / "docs")) for p in PAGES}
    for page in (
        "index.md",
        "getting-started.md",
        "architecture.md",
        "peft-compatibility.md",
        "reference/configuration.md",
        "reference/cli.md",
        "explanations/benchmarks.md",
        "how-to/own-data.md",
        "how-to/own-encoder.md",
        "how-to/ner.md",
        "how-to/peft.md",
        "how-to/compression.md",
        "how-to/sweeps.md",
        "how-to/team.md",
        "how-to/distributed.md",
        "how-to/slurm.md",
        "how-to/gpus.md",
        "how-to/serving.md",
        "how-to/batch-scoring.md",
        "how-to/drift.md",
    ):
        assert page in names


def test_the_readme_links_the_architecture_page():
    assert "(docs/architecture.md)" in README.read_text()


def test_the_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail into docs/"


def test_every_relative_link_of_the_readme_resolves_inside_the_repository():
    targets = [t for t in LINK.findall(README.read_text()) if "://" not in t]
    assert len(targets) > 10
    bad = []
    for target in targets:
        path = (ROOT / target.split("#")[0]).resolve()
        if not path.is_relative_to(ROOT) or not path.exists():
            bad.append(target)
    assert bad == []


def _readme_commands() -> list[list[str]]:
    """The shell commands of the README's bash blocks, continuation lines joined, comments
    dropped."""
    commands = []
    for lang, body in FENCE.findall(README.read_text()):
        if lang not in ("bash", "sh", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def _make_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))


def test_every_make_target_the_readme_and_the_docs_name_exists():
    targets = _make_targets()
    named = set()
    for page in (README, *PAGES):
        named |= set(re.findall(r"(?:`|^)make ([a-z][\w-]*)", page.read_text(), re.M))
    assert named - targets == set()


def test_every_command_of_the_readme_exists_and_its_overrides_validate():
    from trimflow.cli import build_parser
    from trimflow.config.loading import compose_config

    commands = _readme_commands()
    assert [c for c in commands if c[0] == "make"], "the README shows its make commands"
    parser = build_parser()
    subcommands = next(a for a in parser._actions if hasattr(a, "choices") and a.choices).choices
    for words in commands:
        if words[0] == "make":
            assert words[1] in _make_targets(), words
        elif words[0] == "trimflow":
            assert words[1] in subcommands, words
            if words[1] == "params":
                # Composes and validates the README's overrides without writing params.yaml.
                compose_config([w for w in words[2:] if not w.startswith("--")])
            else:
                parser.parse_args(words[1:])


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
