"""`trimflow compare` on a hand-built MLflow store: selection, tables, ratios, files, errors."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from trimflow.cli import main
from trimflow.tracking.compare import (
    CompareError,
    build_comparison,
    metric_list,
    ratio,
    ratio_direction,
    smaller_is_better,
)
from trimflow.tracking.compare_query import compare
from trimflow.tracking.compare_render import render_markdown, write_outputs

T0 = 1_700_000_000_000  # ms; runs are created at explicit times so "latest" is unambiguous
COMMON = {"seed": "0", "finetune.lr": "0.0001"}
VARIANTS = {
    "finetuned": (
        {**COMMON, "quantize.scheme": "fp32"},
        {
            "test/accuracy": 0.5,
            "bench/latency_ms_p50": 8.0,
            "model/size_mb": 400.0,
            "bench/throughput_sps": 100.0,
        },
    ),
    "pruned": (
        {**COMMON, "quantize.scheme": "fp32", "prune.ffn_fraction": "0.5"},
        {
            "test/accuracy": 0.375,
            "bench/latency_ms_p50": 4.0,
            "model/size_mb": 200.0,
            "bench/throughput_sps": 250.0,
        },
    ),
    "quantized": (
        {**COMMON, "quantize.scheme": "int8"},
        {
            "test/accuracy": 0.25,
            "bench/latency_ms_p50": 2.0,
            "model/size_mb": 100.0,
            "bench/throughput_sps": 400.0,
        },
    ),
}


def new_run(client, experiment_id, name, start, tags, params=None, metrics=None):
    """A finished run with these tags, params and metrics."""
    from mlflow.entities import Metric, Param

    run = client.create_run(experiment_id, start_time=start, tags=tags, run_name=name)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(key, value, start, 0) for key, value in (metrics or {}).items()],
        params=[Param(key, value) for key, value in (params or {}).items()],
    )
    client.set_terminated(run.info.run_id, end_time=start + 1)
    return run.info.run_id


def new_variant(client, experiment_id, parent, variant, start, params, metrics):
    """A `variant:<name>` child run tagged like `log_variant_run` does."""
    tags = {
        "mlflow.parentRunId": parent,
        "trimflow.stage": "evaluate",
        "trimflow.variant": variant,
    }
    return new_run(client, experiment_id, f"variant:{variant}", start, tags, params, metrics)


def pipeline(client, experiment_id, start, parent=None, name="dvc repro", params=None):
    """A pipeline parent run (optionally a sweep point under `parent`)."""
    tags = {"trimflow.stage": "pipeline"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    return new_run(client, experiment_id, name, start, tags, params)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tracking_db):
    """An experiment holding a sweep, an old and a latest pipeline run, then an empty one."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_db)
    name = tmp_path_factory.mktemp("compare").name
    exp = client.create_experiment(name)

    sweep = new_run(
        client, exp, "sweep multirun", T0, {"trimflow.stage": "sweep", "trimflow.sweep": "/x"}
    )
    points = []
    for i, lr in enumerate(("0.0001", "0.0005"), start=1):
        params = {**COMMON, "finetune.lr": lr}
        point = pipeline(client, exp, T0 + i, sweep, f"finetune.lr={lr}", params)
        scores = {"test/accuracy": 0.5 * i, "bench/latency_ms_p50": 8.0 / i}
        new_variant(client, exp, point, "finetuned", T0 + 10 + i, {}, scores)
        points.append(point)

    old = pipeline(client, exp, T0 + 1000)
    new_variant(client, exp, old, "finetuned", T0 + 1001, *VARIANTS["finetuned"])

    latest = pipeline(client, exp, T0 + 2000)
    stage = {"mlflow.parentRunId": latest, "trimflow.stage": "evaluate"}
    new_run(client, exp, "evaluate", T0 + 2001, stage, COMMON)
    ids = {
        variant: new_variant(client, exp, latest, variant, T0 + 2002 + i, *values)
        for i, (variant, values) in enumerate(VARIANTS.items())
    }
    pipeline(client, exp, T0 + 3000)  # an up-to-date `make run`: a parent without variants
    return {
        "uri": tracking_db,
        "experiment": name,
        "latest": latest,
        "old": old,
        "variants": ids,
        "sweep": sweep,
        "points": points,
        "client": client,
    }


def default_comparison(store, **kwargs):
    """`compare` on the module's store and experiment."""
    return compare(store["uri"], store["experiment"], **kwargs)


def test_default_compares_the_variants_of_the_latest_pipeline_with_variants(store):
    comparison = default_comparison(store)
    assert [run.label for run in comparison.runs] == [
        "finetuned",
        "pruned",
        "quantized",
    ]
    assert [run.run_id for run in comparison.runs] == list(store["variants"].values())
    assert store["latest"] in comparison.description
    assert comparison.baseline == "finetuned"
    assert comparison.others == ["pruned", "quantized"]
    assert default_comparison(store, latest_pipeline=True) == comparison


def test_only_params_that_differ_are_kept(store):
    assert default_comparison(store).params == {
        "prune.ffn_fraction": {
            "finetuned": None,
            "pruned": "0.5",
            "quantized": None,
        },
        "quantize.scheme": {
            "finetuned": "fp32",
            "pruned": "fp32",
            "quantized": "int8",
        },
    }


def test_metric_values_and_ratios_against_the_baseline(store):
    comparison = default_comparison(store)
    assert list(comparison.metrics) == [
        "test/accuracy",
        "bench/latency_ms_p50",
        "bench/throughput_sps",
        "model/size_mb",
    ]
    assert comparison.metrics["test/accuracy"] == {
        "finetuned": 0.5,
        "pruned": 0.375,
        "quantized": 0.25,
    }
    assert comparison.ratios == {
        "test/accuracy": {"pruned": 0.75, "quantized": 0.5},
        "bench/latency_ms_p50": {"pruned": 2.0, "quantized": 4.0},
        "bench/throughput_sps": {"pruned": 2.5, "quantized": 4.0},
        "model/size_mb": {"pruned": 2.0, "quantized": 4.0},
    }


def test_baseline_by_variant_run_id_or_first_run(store):
    by_variant = default_comparison(store, baseline="quantized")
    assert by_variant.baseline == "quantized"
    assert by_variant.ratios["test/accuracy"] == {"finetuned": 2.0, "pruned": 1.5}
    assert by_variant.ratios["model/size_mb"] == {"finetuned": 0.25, "pruned": 0.5}
    by_id = default_comparison(store, baseline=store["variants"]["pruned"])
    assert by_id.baseline == "pruned"
    assert default_comparison(store, baseline="variant:pruned").baseline == "pruned"
    explicit = default_comparison(
        store, refs=[store["variants"]["quantized"], store["variants"]["finetuned"]]
    )
    assert explicit.baseline == "quantized"
    with pytest.raises(CompareError, match="baseline 'distilled' is none of the compared runs"):
        default_comparison(store, baseline="distilled")


def test_explicit_runs_by_id_and_unique_name(store):
    comparison = default_comparison(store, refs=["variant:pruned", store["old"]])
    assert [run.run_id for run in comparison.runs] == [store["variants"]["pruned"], store["old"]]
    assert comparison.metrics["test/accuracy"] == {"pruned": 0.375, "dvc repro": None}
    assert comparison.ratios["test/accuracy"] == {"dvc repro": None}


def test_ambiguous_name_lists_the_matching_runs(store):
    with pytest.raises(CompareError, match="matches 4 runs") as err:
        default_comparison(store, refs=["variant:finetuned"])
    assert store["variants"]["finetuned"] in str(err.value)


def test_unknown_run_and_unknown_metric(store):
    with pytest.raises(CompareError, match="no run with id or name 'nope'"):
        default_comparison(store, refs=["nope"])
    with pytest.raises(CompareError, match="no run with id or name '0{32}'"):
        default_comparison(store, refs=["0" * 32])
    with pytest.raises(CompareError, match="unknown metric.*test/f1"):
        default_comparison(store, metrics=["test/accuracy", "test/f1"])


def test_metrics_option_keeps_the_order_given(store):
    comparison = default_comparison(store, metrics=metric_list("model/size_mb, test/accuracy,"))
    assert list(comparison.metrics) == ["model/size_mb", "test/accuracy"]
    assert list(comparison.ratios) == ["model/size_mb", "test/accuracy"]


def test_sweep_compares_the_pipeline_runs_by_params(store):
    comparison = default_comparison(store, sweep=True)
    labels = ["finetune.lr=0.0001", "finetune.lr=0.0005"]
    assert [run.run_id for run in comparison.runs] == store["points"]
    assert [run.label for run in comparison.runs] == labels
    assert store["sweep"] in comparison.description
    assert comparison.params == {"finetune.lr": {labels[0]: "0.0001", labels[1]: "0.0005"}}
    assert comparison.metrics["finetuned/test/accuracy"] == {labels[0]: 0.5, labels[1]: 1.0}
    assert comparison.ratios == {
        "finetuned/test/accuracy": {labels[1]: 2.0},
        "finetuned/bench/latency_ms_p50": {labels[1]: 2.0},
    }


def test_selection_modes_are_exclusive(store):
    with pytest.raises(CompareError, match="not several"):
        default_comparison(store, refs=["variant:pruned"], sweep=True)


def test_missing_store_experiment_or_runs(store, tmp_path):
    missing = tmp_path / "absent.db"
    with pytest.raises(CompareError, match="no MLflow store at"):
        compare(f"sqlite:///{missing}")
    assert not missing.exists()
    with pytest.raises(CompareError, match="no MLflow experiment 'nothing-here'"):
        compare(store["uri"], "nothing-here")
    empty = f"empty-{tmp_path.name}"
    store["client"].create_experiment(empty)
    with pytest.raises(CompareError, match=f"experiment '{empty}' .* has no runs"):
        compare(store["uri"], empty)
    lone = f"lone-{tmp_path.name}"
    new_run(store["client"], store["client"].create_experiment(lone), "x", T0, {})
    with pytest.raises(CompareError, match="no pipeline run"):
        compare(store["uri"], lone)
    with pytest.raises(CompareError, match="no sweep run"):
        compare(store["uri"], lone, sweep=True)


def test_unreachable_server(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(CompareError, match="http://127.0.0.1:9 is unreachable"):
        compare("http://127.0.0.1:9")


def test_files_are_written_and_parse(store, tmp_path):
    comparison = default_comparison(store)
    paths = write_outputs(comparison, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "compare.csv",
        "compare.json",
        "compare.md",
    ]
    assert [p.name for p in paths] == ["compare.json", "compare.csv", "compare.md"]
    payload = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert payload["baseline"] == "finetuned"
    assert [run["variant"] for run in payload["runs"]] == ["finetuned", "pruned", "quantized"]
    assert payload["params"] == comparison.params
    assert payload["metrics"] == comparison.metrics
    assert payload["ratios"]["bench/latency_ms_p50"] == {
        "direction": "baseline/run",
        "values": {"pruned": 2.0, "quantized": 4.0},
    }
    assert payload["ratios"]["test/accuracy"]["direction"] == "run/baseline"
    with open(tmp_path / "out" / "compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["metric"] for row in rows] == list(comparison.metrics)
    assert rows[0]["finetuned"] == "0.5"
    assert rows[0]["ratio direction"] == "run/baseline"
    assert rows[0]["quantized ratio"] == "0.5"
    assert "pruned" in rows[0] and "finetuned ratio" not in rows[0]
    markdown = (tmp_path / "out" / "compare.md").read_text()
    assert markdown == render_markdown(comparison)
    assert "## Params that differ" in markdown and "## Metrics" in markdown
    assert "| quantize.scheme | fp32 | fp32 | int8 |" in markdown
    assert "| metric | ratio (×) | finetuned (baseline) | pruned | quantized |" in markdown
    assert "| bench/latency_ms_p50 | baseline/run | 8 | 4 (2.00×) | 2 (4.00×) |" in markdown
    assert "| test/accuracy | run/baseline | 0.5000 | 0.3750 (0.75×) | 0.2500 (0.50×) |" in markdown


def test_markdown_says_when_no_param_differs(store):
    single = default_comparison(store, refs=["variant:pruned"])
    assert "All params are equal." in render_markdown(single)


def test_cli_prints_the_tables_and_writes_the_files(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "cmp"
    argv = ["compare", "--uri", store["uri"], "--experiment", store["experiment"]]
    assert main([*argv, "--out", str(out), "--metrics", "test/accuracy"]) == 0
    printed = capsys.readouterr().out
    for text in ("Params that differ", "Metrics", "quantize.scheme", "finetuned (baseline)"):
        assert text in printed
    assert "test/accuracy" in printed and "0.3750 (0.75×)" in printed
    assert "model/size_mb" not in printed
    assert json.loads((out / "compare.json").read_text())["metrics"].keys() == {"test/accuracy"}


def test_cli_exits_2_naming_what_is_missing(store, tmp_path, caplog):
    argv = ["compare", "--uri", store["uri"], "--experiment", store["experiment"]]
    with caplog.at_level(logging.ERROR, logger="trimflow"):
        assert main([*argv, "nope", "--out", str(tmp_path)]) == 2
        assert main([*argv, "--metrics", "test/f1", "--out", str(tmp_path)]) == 2
    assert "no run with id or name 'nope'" in caplog.text
    assert "unknown metric(s) test/f1" in caplog.text
    assert not list(Path(tmp_path).iterdir())


def test_ratio_direction_and_undefined_ratios():
    assert smaller_is_better("bench/latency_ms_p95") and smaller_is_better("model/size_mb")
    assert smaller_is_better("pruned/bench/latency_ms_p50")
    assert not smaller_is_better("bench/throughput_sps")
    assert smaller_is_better("training/peak_mem_mb") and smaller_is_better("training/seconds")
    assert not smaller_is_better("training/samples_per_s")
    assert ratio_direction("model/size_mb") == "baseline/run"
    assert ratio("model/size_mb", 100.0, 0.0) is None
    assert ratio("test/accuracy", None, 0.5) is None
    assert ratio("test/accuracy", 0.5, 0.25) == 0.5


def test_build_comparison_drops_non_finite_values():
    from trimflow.tracking.compare import ComparedRun, Selection

    runs = [
        ComparedRun("a", "1" * 32, "a", "", metrics={"test/accuracy": float("nan")}),
        ComparedRun("b", "2" * 32, "b", "", metrics={"test/accuracy": 0.5}),
    ]
    comparison = build_comparison(Selection("two runs", runs))
    assert comparison.metrics == {"test/accuracy": {"a": None, "b": 0.5}}
    assert comparison.ratios == {"test/accuracy": {"b": None}}


def test_uri_option_then_environment_then_project_store(monkeypatch):
    from trimflow.tracking import runs
    from trimflow.tracking.compare_query import DEFAULT_URI, resolve_uri

    monkeypatch.setattr(runs, "USER_TRACKING_URI", None)
    assert resolve_uri(None) == DEFAULT_URI
    monkeypatch.setattr(runs, "USER_TRACKING_URI", "http://mlflow.internal:5000")
    assert resolve_uri(None) == "http://mlflow.internal:5000"
    assert resolve_uri("sqlite:///other.db") == "sqlite:///other.db"
