"""dvc.yaml's code deps: the import closure of each stage, checked and written by `trimflow dag`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from trimflow.cli import main
from trimflow.dag import DagError, check_deps, import_closure

ROOT = Path(__file__).resolve().parents[1]
STAGE = """
from typing import TYPE_CHECKING

from trimflow.pkg import VALUE, sub
from trimflow.logging_only import log

if TYPE_CHECKING:
    from trimflow.typed import Hint


def run():
    from trimflow.lazy import work
"""
SYNTHETIC = {
    "trimflow/__init__.py": "",
    "trimflow/stages/__init__.py": "",
    "trimflow/stages/one.py": STAGE,
    "trimflow/pkg/__init__.py": "VALUE = 1\n",
    "trimflow/pkg/sub.py": "from .deep import helper\n",
    "trimflow/pkg/deep.py": "",
    "trimflow/lazy.py": "",
    "trimflow/typed.py": "",
    "trimflow/logging_only.py": "from trimflow.heavy import client\n",
    "trimflow/heavy.py": "",
    "trimflow/unused.py": "",
}


@pytest.fixture
def synthetic_src(tmp_path) -> Path:
    for name, source in SYNTHETIC.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    return tmp_path


@pytest.mark.parametrize(
    ("module", "runs"),
    [
        ("trimflow.lazy", True),  # imported inside a function: runs when it is called
        ("trimflow.typed", False),  # under `if TYPE_CHECKING:`
        ("trimflow.pkg.sub", True),  # a submodule, through `from trimflow.pkg import sub`
        ("trimflow.pkg.deep", True),  # a relative import in sub
        ("trimflow.pkg", True),  # parent packages' __init__.py
        ("trimflow.stages", True),
        ("trimflow", True),
        ("trimflow.logging_only", False),  # allowlisted
        ("trimflow.heavy", False),  # imported by the allowlisted module only
        ("trimflow.unused", False),
    ],
)
def test_import_closure(synthetic_src, module, runs):
    closure = import_closure(
        synthetic_src, ["trimflow.stages.one"], allowlist=frozenset({"trimflow.logging_only"})
    )
    assert (module in closure) == runs


def test_an_import_without_a_file_is_an_error(synthetic_src):
    (synthetic_src / "trimflow/lazy.py").write_text("from trimflow.gone import thing\n")
    with pytest.raises(DagError, match="trimflow.gone"):
        import_closure(synthetic_src, ["trimflow.stages.one"])


def test_trimflow_dag_check_passes_on_the_repo(monkeypatch, capsys):
    """Fails on any module a stage runs that dvc.yaml does not list (or one it lists needlessly)."""
    monkeypatch.chdir(ROOT)
    assert main(["dag", "--check"]) == 0, capsys.readouterr().out


def test_write_restores_a_missing_dep_drops_a_needless_one_and_keeps_the_rest(
    tmp_path, monkeypatch
):
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__"))
    exact = (ROOT / "dvc.yaml").read_text()
    missing = "      - src/trimflow/data/ner.py\n"  # prepare's
    tokenize_module = "      - src/trimflow/stages/tokenize.py\n"
    config_files = "      - src/trimflow/config/loading.py\n      - src/trimflow/config/schema.py\n"
    assert exact.count(missing) == 1 and exact.index(config_files) < exact.index(tokenize_module)
    edited = (
        exact.replace(missing, "")
        .replace(config_files, "      - src/trimflow/config\n", 1)  # prepare's, as a folder
        .replace(tokenize_module, tokenize_module + "      - src/trimflow/report/render.py\n")
    )
    (tmp_path / "dvc.yaml").write_text(edited)
    assert check_deps(tmp_path) == [
        "prepare: runs src/trimflow/data/ner.py, not a dep",
        "tokenize: dep src/trimflow/report/render.py is not run",
    ]

    monkeypatch.chdir(tmp_path)
    assert main(["dag", "--write"]) == 0
    assert (tmp_path / "dvc.yaml").read_text() == exact  # comments and layout included
