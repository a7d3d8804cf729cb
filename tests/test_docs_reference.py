"""The generated reference pages: up to date with the code, and complete."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trimflow import reference
from trimflow.config import schema

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("page", sorted(reference.PAGES))
def test_the_generated_page_is_up_to_date(page):
    committed = (ROOT / page).read_text() if (ROOT / page).exists() else ""
    assert committed == reference.PAGES[page](), (
        f"{page} is stale: run `{reference.REGENERATE}` (or `make docs-reference`) and commit it"
    )


def test_the_generation_is_deterministic():
    assert reference.config_reference() == reference.config_reference()
    assert reference.cli_reference() == reference.cli_reference()


def _models() -> list[type[schema.BaseModel]]:
    return [
        value
        for value in vars(schema).values()
        if isinstance(value, type)
        and issubclass(value, schema.BaseModel)
        and value.__module__ == schema.__name__
    ]


def test_every_field_of_the_schema_has_a_description():
    bare = [
        f"{model.__name__}.{name}"
        for model in _models()
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert bare == []


def _keys(value, prefix=""):
    """Every dotted key of the default composition; a variant mapping's entries as <name>."""
    if not isinstance(value, dict):
        yield prefix
        return
    if prefix.endswith(("variants", "students")):
        for entry in value.values():
            yield from _keys(entry, f"{prefix}.<name>")
        if not value:
            yield prefix
        return
    if prefix.endswith(".mask"):
        yield prefix
        return
    for name, item in value.items():
        yield from _keys(item, f"{prefix}.{name}" if prefix else name)


def test_the_configuration_page_lists_every_key_of_the_default_composition():
    from trimflow.config.loading import compose_raw

    page = reference.config_reference()
    raw = OmegaConf.to_container(compose_raw(), resolve=True)
    missing = [key for key in sorted(set(_keys(raw))) if f"`{key}`" not in page]
    assert missing == []
    # NER's own keys and every adapter method are documented too, though the default leaves
    # them out.
    for key in (
        "task.repair_iob",
        "adapt.variants.<name>.init_r",
        "prune.variants.<name>.sparsity",
    ):
        assert f"`{key}`" in page


def test_the_cli_page_lists_every_command_argument_and_make_target():
    import re

    from trimflow.cli import build_parser

    page = reference.cli_reference()
    parser = build_parser()
    commands = next(a for a in parser._actions if hasattr(a, "choices") and a.choices).choices
    for name, sub in commands.items():
        assert f"## trimflow {name}" in page
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in page, (name, option)
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^([a-z][\w-]*):[^=\n]*##", makefile, re.M):
        assert f"`make {target}`" in page


def test_check_exits_1_on_a_stale_page_and_names_the_command(tmp_path, capsys, monkeypatch):
    for page, render in reference.PAGES.items():
        (tmp_path / page).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / page).write_text(render())
    assert reference.stale_pages(tmp_path) == []
    stale = tmp_path / reference.CONFIG_PAGE
    stale.write_text(stale.read_text().replace("`seed`", "`sead`"))
    assert reference.stale_pages(tmp_path) == [reference.CONFIG_PAGE]
    monkeypatch.setattr(reference, "stale_pages", lambda: [reference.CONFIG_PAGE])
    assert reference.main(["--check"]) == 1
    assert reference.REGENERATE in capsys.readouterr().err
