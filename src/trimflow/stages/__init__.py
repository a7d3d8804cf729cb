"""Stage functions `run(cfg, layout[, variant])`: the flow of each DAG step, no DVC or CLI.

Variant stages (prune, distill, quantize) build one declared variant when `variant` is given
(one DVC foreach stage), or every variant of their kind when it is None (in-process runs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

from trimflow.config.loading import ConfigError
from trimflow.config.schema import TrimflowConfig
from trimflow.layout import STAGES, Layout

StageFn = Callable[..., None]


def stage_function(name: str) -> StageFn:
    """The `run` function of stage `name` (imported lazily: stages pull in torch)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage '{name}'; stages are {', '.join(STAGES)}")
    return importlib.import_module(f"trimflow.stages.{name}").run


def selected_variants(declared: Iterable[str], variant: str | None, config_key: str) -> list[str]:
    """`[variant]` if it is declared under `config_key`, every declared name if it is None."""
    names = list(declared)
    if variant is None:
        return names
    if variant not in names:
        raise ConfigError(
            f"{config_key}: no variant '{variant}' (declared: {', '.join(names) or 'none'})"
        )
    return [variant]


def run_stage(name: str, cfg: TrimflowConfig, layout: Layout, variant: str | None = None) -> None:
    """Run one stage; `variant` only for the variant stages."""
    function = stage_function(name)
    if variant is None:
        function(cfg, layout)
    else:
        function(cfg, layout, variant)
