"""Drift checks end to end: traffic through `trimflow serve` with the prediction log on, then
`trimflow monitor` on each log against evaluate's reference profile.

    python bench/drift_bench.py [--variant NAME] [--texts 500] [--out reports/drift_bench.json]

Run after the pipeline (classification, the R8 default), from the project root. The variant
(default: the recommended one, which evaluate profiled) is served on 127.0.0.1 once per
scenario, each with a prediction log of its own, and sent the scenario's texts by 16 clients:

- `test_sample`: `--texts` texts drawn from the test split (the reference's own population);
- `validation_sample`: `--texts` texts of the validation split, which the profile never saw;
- `wnut_tweets`: the packaged WNUT-16 tweets (`task=ner`'s data), words joined by spaces;
- `one_class`: test texts of the test split's most frequent label only.

The first two must not drift (exit 0), the last two must (exit 1). Each scenario's monitor.json
and monitor.html are kept under `reports/drift_bench/<scenario>/`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from variant_inputs import bench_variant_dir

from trimflow.config.loading import compose_config, load_params
from trimflow.data.sources import load_tagged_splits
from trimflow.evaluation.machine import environment
from trimflow.layout import dvc_layout
from trimflow.monitoring.profile import split_texts
from trimflow.serving.loadgen import run_load
from trimflow.serving.server import TrimflowServer
from trimflow.utils.atomic import write_json

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
EXPECTED_EXIT = {"test_sample": 0, "validation_sample": 0, "wnut_tweets": 1, "one_class": 1}
CLIENTS = 16
SEED = 0


def scenario_texts(layout, task: str, count: int) -> dict[str, list[str]]:
    """The texts each scenario sends (see the module docstring)."""
    rng = np.random.default_rng(SEED)
    test = pd.read_parquet(layout.prepared / "test.parquet")
    validation = split_texts(layout.prepared, "validation", task)
    majority = test["label"].value_counts().idxmax()
    wnut = [  # the packaged file is one split: prepare cuts train/validation/test from it
        sentence
        for split in load_tagged_splits(compose_config(["task=ner"]).dataset).values()
        for sentence in split
    ]
    return {
        "test_sample": rng.choice(test["text"].to_numpy(), count, replace=False).tolist(),
        "validation_sample": rng.choice(
            validation, min(count, len(validation)), replace=False
        ).tolist(),
        "wnut_tweets": [" ".join(sentence.tokens) for sentence in wnut][:count],
        "one_class": test.loc[test["label"] == majority, "text"].tolist()[:count],
    }


def logged_traffic(variant: str, texts: list[str], log_path: Path, workdir: Path) -> dict:
    """Serve `variant` with its prediction log at `log_path`, send `texts` once; the load's
    summary."""
    token = secrets.token_urlsafe(32)
    arguments = [
        *("--variant", variant, "--params", str(Path("params.yaml").resolve())),
        *("serve.rate_limit=null", f"serve.prediction_log.path={log_path}"),
    ]
    workdir.mkdir()
    (workdir / "models").symlink_to(Path("models").resolve())  # `--variant` reads models/
    with TrimflowServer(workdir, arguments, {"TRIMFLOW_SERVE_TOKEN": token}) as server:
        server.wait_until_ready(token)
        run = run_load(server.url, texts, CLIENTS, max_requests=len(texts), token=token)
    return run.summary()


def monitor(log_path: Path, reference: Path, out: Path) -> tuple[int, dict]:
    """`trimflow monitor`'s exit status and monitor.json on one log."""
    command = [sys.executable, "-m", "trimflow.cli", "monitor", "--log", str(log_path)]
    command += ["--reference", str(reference), "--out", str(out)]
    status = subprocess.run(command, capture_output=True, text=True)
    if status.returncode not in (0, 1):
        raise SystemExit(f"trimflow monitor exited {status.returncode}:\n{status.stderr[-3000:]}")
    return status.returncode, json.loads((out / "monitor.json").read_text())


def print_results(results: dict) -> None:
    table = Table(title=f"drift of traffic to {results['variant']} (reports/drift_bench.json)")
    for column in ("scenario", "texts", "exit", "expected", "drifted features", "largest PSI"):
        table.add_column(column)
    for name, scenario in results["scenarios"].items():
        features = scenario["features"]
        measured = [feature for feature, row in features.items() if row["psi"] is not None]
        largest = max(measured, key=lambda feature: features[feature]["psi"])
        table.add_row(
            name,
            str(scenario["texts"]),
            str(scenario["exit"]),
            str(EXPECTED_EXIT[name]),
            ", ".join(feature for feature, row in features.items() if row["drifted"]) or "-",
            f"{largest} {features[largest]['psi']:.2f}",
        )
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", help="a variant under models/ (default: the recommended)")
    parser.add_argument("--texts", type=int, default=500, help="texts per scenario, at most")
    parser.add_argument("--out", default="reports/drift_bench.json")
    args = parser.parse_args()
    cfg, layout = load_params(), dvc_layout()
    if cfg.task.type != "classification":
        raise SystemExit("the drift scenarios are those of the classification default (R8)")
    variant, _ = bench_variant_dir(layout, args.variant)
    reference = layout.reference_profile
    if not reference.is_file():
        raise SystemExit(f"{reference} not found: run the pipeline (evaluate writes it) first")
    pages = Path(args.out).with_suffix("")
    results = {"variant": variant, "reference": str(reference), "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="trimflow-drift-") as tmp:
        for name, texts in scenario_texts(layout, cfg.task.type, args.texts).items():
            Console(stderr=True).print(f"{name}: {len(texts)} texts through trimflow serve")
            log_path = Path(tmp) / f"{name}.jsonl"
            load = logged_traffic(variant, texts, log_path, Path(tmp) / name)
            status, report = monitor(log_path, reference, pages / name)
            results["scenarios"][name] = {
                "texts": len(texts),
                "answered": load["answered"],
                "exit": status,
                "expected_exit": EXPECTED_EXIT[name],
                "features": report["features"],
            }
    results["all_as_expected"] = all(
        scenario["exit"] == scenario["expected_exit"] for scenario in results["scenarios"].values()
    )
    results["environment"] = environment()
    write_json(args.out, results)
    print_results(results)


if __name__ == "__main__":
    main()
