"""Running real `trimflow <stage>` processes for the benchmarks that compare stage runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import yaml

from trimflow.config.loading import compose_config


def run_stage(root: Path, stage: str, overrides: list[str], *args: str) -> float:
    """`trimflow <stage> [args]` in `root` with params.yaml composed from `overrides`; its wall
    time."""
    params = compose_config(overrides).model_dump(mode="json")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "trimflow.cli", stage, *args],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        command = " ".join([stage, *args, *overrides])
        raise SystemExit(f"trimflow {command} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - started
