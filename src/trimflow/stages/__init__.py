"""Stage functions `run(cfg, layout)`: the flow of each DAG step, no DVC or CLI knowledge."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from trimflow.config.schema import TrimflowConfig
from trimflow.layout import STAGES, Layout

StageFn = Callable[[TrimflowConfig, Layout], None]


def stage_function(name: str) -> StageFn:
    """The `run` function of stage `name` (imported lazily: stages pull in torch)."""
    if name not in STAGES:
        raise ValueError(f"unknown stage '{name}'; stages are {', '.join(STAGES)}")
    return importlib.import_module(f"trimflow.stages.{name}").run
