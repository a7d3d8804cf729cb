"""`trimflow dag`: dvc.yaml's code deps, computed from the imports each stage runs.

A stage runs its module `trimflow.stages.<stage>` (named by its `trimflow <stage>` cmd) and the
plumbing every `trimflow <stage>` goes through. Its code is the transitive closure of their
`trimflow.*` imports, read from the source (nothing is imported): imports inside functions
count, since they run when called; those under `if TYPE_CHECKING:` do not; `from a import b`
counts `a.b` when it is a module; importing a module runs its parent packages' `__init__.py`.
A module is covered when dvc.yaml lists its file or a folder above it; empty files are no deps.
"""

from __future__ import annotations

import ast
import logging
import shlex
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from trimflow.layout import STAGES
from trimflow.utils.atomic import atomic_file

log = logging.getLogger(__name__)
PACKAGE = "trimflow"
DVC_FILE = "dvc.yaml"
SOURCE_DIR = "src"  # dvc.yaml's code deps are the paths under it
# What `trimflow <stage>` runs besides the stage module (cli.run_dvc_stage): it loads and
# validates params.yaml, builds the fixed layout and calls the stage through trimflow.stages.
PLUMBING = ("trimflow.config.loading", "trimflow.layout", "trimflow.stages")
# Code that cannot change what a stage writes, so it need not be a dep. Its imports are not
# followed: they serve the same purpose (cli.py's reach the whole pipeline through its other
# commands), and what a stage's outputs do depend on, the stage's own modules import.
ALLOWLIST = frozenset(
    {
        "trimflow.cli",  # argument parsing, exit codes; its path to a stage is PLUMBING
        "trimflow.tracking.runs",  # MLflow runs, tags, params and metrics: logging only
        "trimflow.serving.registry",  # report registers the recommended model in MLflow
        # Atomic writes; also write_json's JSON layout: after changing that, `dvc repro -f`.
        "trimflow.utils.atomic",
        "trimflow.utils.interrupt",  # signal handling: a stage stops, keeping nothing half-written
        # Progress lines of training and evaluate's loops: they read the state, change nothing.
        "trimflow.models.progress",
        "trimflow.utils.progress",
    }
)


class DagError(Exception):
    """dvc.yaml or the source cannot be read as this module expects."""


def module_file(src: Path, module: str) -> Path | None:
    """The file of `module` under `src` (a package's `__init__.py`), None if there is none."""
    base = src.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    """`TYPE_CHECKING` or `typing.TYPE_CHECKING`."""
    if isinstance(test, ast.Attribute):
        return test.attr == "TYPE_CHECKING"
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of `tree` but those only type checkers see (`if TYPE_CHECKING:` bodies)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
        else:
            pending.extend(ast.iter_child_nodes(node))


def _absolute(package: str, module: str | None, level: int) -> str:
    """The absolute name of `from <level dots><module> import ...` inside `package`."""
    if not level:
        return module
    parts = package.split(".")
    if level > len(parts):
        raise DagError(f"relative import beyond the top package in {package}")
    base = ".".join(parts[: len(parts) - level + 1])
    return f"{base}.{module}" if module else base


def _in_package(module: str) -> bool:
    return module == PACKAGE or module.startswith(f"{PACKAGE}.")


def imported_modules(src: Path, module: str) -> set[str]:
    """The `trimflow.*` modules `module` imports at runtime, anywhere in its source."""
    path = module_file(src, module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(package, node.module, node.level)
            found.add(base)
            found.update(
                f"{base}.{alias.name}"
                for alias in node.names
                if module_file(src, f"{base}.{alias.name}")
            )
    return {name for name in found if _in_package(name)}


def _parent_packages(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def import_closure(
    src: Path, roots: Iterable[str], allowlist: frozenset[str] = ALLOWLIST
) -> set[str]:
    """`roots` and every module they run, transitively, parent packages included.

    Allowlisted modules are left out and their imports not followed.
    """
    closure: set[str] = set()
    pending = list(roots)
    while pending:
        module = pending.pop()
        if module in closure or module in allowlist:
            continue
        if module_file(src, module) is None:
            raise DagError(f"{module} is imported but has no file under {src}")
        closure.add(module)
        pending += _parent_packages(module)
        pending += imported_modules(src, module)
    return closure


def _is_empty(path: Path) -> bool:
    """An empty file (a bare package marker): it runs nothing, so it is no dep (DVC warns
    about empty deps); once it holds code, `--check` asks for it."""
    return path.is_file() and not path.stat().st_size


def stage_code(root: Path, stage: str) -> list[str]:
    """The non-empty source files (relative to `root`) that `trimflow <stage>` runs, sorted."""
    src = root / SOURCE_DIR
    modules = import_closure(src, [f"{PACKAGE}.stages.{stage}", *PLUMBING])
    files = [module_file(src, module) for module in modules]
    return sorted(file.relative_to(root).as_posix() for file in files if not _is_empty(file))


def _round_trip_yaml() -> YAML:
    """ruamel.yaml in round-trip mode, laid out like dvc.yaml (comments are kept)."""
    yaml = YAML()
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 4096
    yaml.preserve_quotes = True
    return yaml


def _stage_definitions(dvc: dict) -> Iterator[tuple[str, dict]]:
    """(name, definition) of every stage of dvc.yaml; a foreach stage's is its `do:` block."""
    for name, stage in dvc["stages"].items():
        yield name, stage["do"] if "foreach" in stage else stage


def _stage_run_by(name: str, definition: dict) -> str:
    """The trimflow stage that dvc.yaml stage `name` runs (its cmd is `trimflow <stage> ...`)."""
    argv = shlex.split(definition["cmd"])
    if len(argv) < 2 or argv[0] != PACKAGE or argv[1] not in STAGES:
        raise DagError(f"{name}: cmd is not `trimflow <stage>`: {definition['cmd']}")
    return argv[1]


def _is_code(dep: Any) -> bool:
    return isinstance(dep, str) and (dep == SOURCE_DIR or dep.startswith(f"{SOURCE_DIR}/"))


def _covered_files(root: Path, dep: str) -> list[str]:
    """The non-empty Python files a code dep covers: itself, or those in the folder it names."""
    path = root / dep
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return [file.relative_to(root).as_posix() for file in files if not _is_empty(file)]


def _covers(dep: str, file: str) -> bool:
    return file == dep or file.startswith(f"{dep.rstrip('/')}/")


def check_deps(root: Path) -> list[str]:
    """Every code file a stage runs that is not a dep, and every code dep it does not run."""
    problems = []
    dvc = _round_trip_yaml().load(root / DVC_FILE)
    for name, definition in _stage_definitions(dvc):
        needed = set(stage_code(root, _stage_run_by(name, definition)))
        deps = [dep for dep in definition.get("deps", []) if _is_code(dep)]
        problems += [
            f"{name}: runs {file}, not a dep"
            for file in sorted(needed)
            if not any(_covers(dep, file) for dep in deps)
        ]
        problems += [
            f"{name}: dep {dep} is not run"
            if file == dep
            else f"{name}: dep {dep} covers {file}, not run"
            for dep in deps
            for file in _covered_files(root, dep)
            if file not in needed
        ]
    return problems


def write_deps(root: Path) -> None:
    """Rewrite each stage's code deps in dvc.yaml as the files it runs; the rest is kept."""
    yaml = _round_trip_yaml()
    path = root / DVC_FILE
    dvc = yaml.load(path)
    for name, definition in _stage_definitions(dvc):
        deps = definition.setdefault("deps", [])
        deps[:] = stage_code(root, _stage_run_by(name, definition)) + [
            dep for dep in deps if not _is_code(dep)
        ]
    with atomic_file(path) as handle:
        yaml.dump(dvc, handle)


def run_dag(write: bool) -> int:
    """`trimflow dag --check`, or `--write` first: 1 while a code dep is wrong (each listed), 2
    when dvc.yaml or the source is not as expected."""
    root = Path(".")
    try:
        if write:
            write_deps(root)
        problems = check_deps(root)
    except DagError as err:
        log.error("%s", err)
        return 2
    for problem in problems:
        print(problem)
    if problems:
        print(
            f"{len(problems)} problems with the code deps of dvc.yaml: run `trimflow dag --write`"
        )
    return 1 if problems else 0
