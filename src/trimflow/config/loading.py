"""Load, compose and validate configs: from params.yaml (DVC) or from conf/ (Hydra)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import ValidationError

from trimflow.config.schema import TrimflowConfig

HYDRA_VERSION_BASE = "1.3"


def conf_dir() -> Path:
    """conf/ of the project in the working directory (as DVC sees it), else of this checkout."""
    local = Path.cwd() / "conf"
    return (
        local if (local / "config.yaml").exists() else Path(__file__).resolve().parents[3] / "conf"
    )


class ConfigError(ValueError):
    """The config is invalid; the message names every offending key."""


def validate(raw: dict[str, Any] | DictConfig, source: str = "config") -> TrimflowConfig:
    """Check `raw` against the schema, raising ConfigError that names each bad key."""
    if isinstance(raw, DictConfig):
        missing = sorted(OmegaConf.missing_keys(raw))
        if missing:
            raise ConfigError(f"{source}: required keys have no value: {', '.join(missing)}")
        raw = OmegaConf.to_container(raw, resolve=True)
    try:
        return TrimflowConfig.model_validate(raw)
    except ValidationError as err:
        problems = [_problem(e, raw) for e in err.errors()]
        raise ConfigError(f"invalid {source}:\n" + "\n".join(problems)) from None


def _config_key(loc: tuple, raw: Any) -> str:
    """The dotted config key of an error location, without the tag pydantic inserts after a
    variant's name (`prune.variants.pruned.structured.heads_fraction`)."""
    parts, value = [], raw
    for part in loc:
        if isinstance(value, dict) and part not in value and value.get("method") == part:
            continue
        parts.append(str(part))
        value = value.get(part) if isinstance(value, dict) else None
    return ".".join(parts)


def _problem(error: dict[str, Any], raw: Any) -> str:
    """One line per error: the key and what is wrong with its value.

    Cross-section checks run on the whole config and name their keys in the message.
    """
    key = _config_key(error["loc"], raw)
    if not key:
        return f"  {error['msg'].removeprefix('Value error, ')}"
    if error["type"] == "extra_forbidden":
        return f"  {key}: unknown key"
    if error["type"] == "missing":
        return f"  {key}: required key is missing"
    return f"  {key}: {error['msg']} (got {error.get('input')!r})"


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> TrimflowConfig:
    """Load and validate a params.yaml written by DVC's Hydra composition, with `key=value`
    `overrides` (dotted keys, e.g. `serve.port=9000`) over it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found (run `trimflow params` to compose it from conf/)")
    with open(path) as handle:
        raw = yaml.safe_load(handle) or {}
    if overrides:
        try:
            raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise ConfigError(f"bad override: {err}") from None
    return validate(raw, source=str(path))


def compose_raw(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml with Hydra overrides, exactly as DVC does for params.yaml."""
    with initialize_config_dir(str(conf_dir()), version_base=HYDRA_VERSION_BASE):
        try:
            return compose(config_name="config", overrides=list(overrides or []))
        except ConfigCompositionException as err:
            cause = f": {err.__cause__}" if err.__cause__ else ""
            raise ConfigError(f"{err}{cause}") from None


def compose_config(overrides: list[str] | None = None) -> TrimflowConfig:
    """Compose conf/ and validate the result."""
    return validate(compose_raw(overrides), source="composed config")


def write_params(overrides: list[str] | None, path: str | Path = "params.yaml") -> TrimflowConfig:
    """Compose conf/ (validated) and write it as params.yaml for `dvc repro`."""
    from trimflow.utils.atomic import atomic_file

    raw = compose_raw(overrides)
    cfg = validate(raw, source="composed config")
    with atomic_file(path) as handle:
        handle.write(OmegaConf.to_yaml(raw, resolve=True))
    return cfg
