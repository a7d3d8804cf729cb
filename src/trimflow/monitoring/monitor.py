"""`trimflow monitor`: does the logged traffic still look like the test split?

It reads a prediction log (records.py: `trimflow serve`'s, or any file of that format) and
evaluate's reference profile (profile.py), compares each feature (features.py) by PSI and a
two-sample test (drift.py: a feature drifts when both pass their thresholds), and writes
monitor.json and a self-contained monitor.html into the output folder, each atomically.
Exit status: 0 no feature drifted, 1 one did (for a scheduler to alert on), 2 the inputs allow
no verdict (a malformed line, no profile, fewer than `monitor.min_texts` texts).
"""

from __future__ import annotations

import logging
from pathlib import Path

from trimflow.config.schema import MonitorConfig
from trimflow.monitoring.drift import feature_drift
from trimflow.monitoring.features import feature_values, task_features
from trimflow.monitoring.profile import read_profile
from trimflow.monitoring.records import LogFormatError, LoggedText, read_log
from trimflow.monitoring.render import monitor_html
from trimflow.utils.atomic import atomic_file, write_json

SUMMARY_FILE = "monitor.json"
PAGE_FILE = "monitor.html"
log = logging.getLogger(__name__)


def _log_span(records: list[LoggedText]) -> dict:
    """The models the log names and the times of its first and last answers (if logged)."""
    extras = [record.model_extra for record in records]
    times = sorted(str(extra["time"]) for extra in extras if "time" in extra)
    return {
        "models": sorted({str(extra["model"]) for extra in extras if "model" in extra}),
        "first_time": times[0] if times else None,
        "last_time": times[-1] if times else None,
    }


def compare(
    cfg: MonitorConfig,
    task: str,
    reference_values: dict[str, list],
    logged_values: dict[str, list],
) -> dict[str, dict]:
    """Each feature of `task` -> its drift (`drift.feature_drift`) between the two samples."""
    return {
        feature.name: feature_drift(
            feature, reference_values[feature.name], logged_values[feature.name], cfg
        )
        for feature in task_features(task)
    }


def monitor(cfg: MonitorConfig, log_path: Path, reference_path: Path, out_dir: Path) -> dict:
    """Compare the log with the reference profile, write the report, return its summary;
    `LogFormatError` when the inputs allow no verdict."""
    reference = read_profile(reference_path)
    logged = read_log(log_path, reference.task)
    if len(logged) < cfg.min_texts:
        raise LogFormatError(
            f"{log_path}: {len(logged)} texts logged, fewer than monitor.min_texts="
            f"{cfg.min_texts}: too few for a verdict"
        )
    reference_values = feature_values(reference.records, reference.task)
    logged_values = feature_values(logged, reference.task)
    results = compare(cfg, reference.task, reference_values, logged_values)
    drifted = [name for name, result in results.items() if result["drifted"]]
    summary = {
        "drifted": bool(drifted),
        "drifted_features": drifted,
        "thresholds": cfg.model_dump(),
        "inputs": {
            "log": str(log_path),
            "logged_texts": len(logged),
            **_log_span(logged),
            "reference": str(reference_path),
            "reference_variant": reference.variant,
            "reference_texts": len(reference.records),
            "task": reference.task,
        },
        "features": results,
    }
    write_json(out_dir / SUMMARY_FILE, summary)
    with atomic_file(out_dir / PAGE_FILE) as handle:
        handle.write(monitor_html(summary, reference_values, logged_values))
    return summary


def run_monitor(cfg: MonitorConfig, log_path: Path, reference_path: Path, out_dir: Path) -> int:
    """`trimflow monitor`'s exit status (see the module docstring), its verdict logged."""
    try:
        summary = monitor(cfg, log_path, reference_path, out_dir)
    except LogFormatError as error:
        log.error("%s", error)
        return 2
    for name, result in summary["features"].items():
        log.info(
            "%s: PSI %s, p %s%s",
            name,
            "-" if result["psi"] is None else f"{result['psi']:.3f}",
            "-" if result["p_value"] is None else f"{result['p_value']:.2g}",
            ": DRIFT" if result["drifted"] else "",
        )
    if summary["drifted"]:
        log.warning("drift in %s (%s)", ", ".join(summary["drifted_features"]), out_dir)
        return 1
    log.info("no drift (%s)", out_dir)
    return 0
