"""All stages in-process on a tiny BERT, and Hydra multirun sharing upstream work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import mlflow_runs

from trimflow.compress.quantize import load_variant
from trimflow.layout import dvc_layout
from trimflow.pipeline import run_pipeline
from trimflow.stages.evaluate import MLFLOW_NAMES

VARIANTS = ["finetuned", "pruned", "quantized", "pruned_quantized"]


@pytest.fixture
def finished(tiny_config, tmp_path):
    cfg = tiny_config("prune.heads_fraction=0.5", "prune.sparsity=0.4")
    layout = dvc_layout(tmp_path)
    metrics = run_pipeline(cfg, layout)
    return cfg, layout, metrics


def test_metrics_file_has_every_variant_and_field(finished):
    _, _, metrics = finished
    assert list(metrics["variants"]) == VARIANTS
    for values in metrics["variants"].values():
        assert set(values) == set(MLFLOW_NAMES)
        assert 0.0 <= values["accuracy"] <= 1.0
        assert values["latency_ms_p95"] >= values["latency_ms_p50"] > 0
        assert values["throughput_sps"] > 0 and values["size_mb"] > 0


def test_pruned_model_is_smaller_and_sparse(finished):
    _, layout, metrics = finished
    variants = metrics["variants"]
    pruning = json.loads((layout.pruned / "pruning.json").read_text())
    assert sum(len(h) for h in pruning["heads_removed"].values()) == 4  # half of 2 x 4 heads
    assert variants["pruned"]["params"] < variants["finetuned"]["params"]
    assert pruning["magnitude_sparsity"] == pytest.approx(0.4, abs=0.01)
    zeros = variants["pruned"]["params"] - variants["pruned"]["nonzero_params"]
    assert zeros >= 0.39 * (pruning["params_after"] - embedding_params(layout))
    assert variants["quantized"]["size_mb"] < variants["finetuned"]["size_mb"]
    model = load_variant(layout.quantized / "pruned_quantized")
    attention = model.bert.encoder.layer[0].attention.self
    assert attention.num_attention_heads < 4


def embedding_params(layout) -> int:
    """Parameters outside the encoder's prunable Linear layers (embeddings, norms, head)."""
    from trimflow.compress.magnitude import prunable_linears

    model = load_variant(layout.pruned)
    linear = sum(getattr(m, name).numel() for m, name in prunable_linears(model))
    return sum(p.numel() for p in model.parameters()) - linear


def test_report_is_self_contained_with_plots(finished):
    _, layout, _ = finished
    page = (layout.reports / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4
    assert 'src="http' not in page
    markdown = (layout.reports / "report.md").read_text()
    assert "plots/accuracy_vs_latency.png" in markdown
    assert (layout.plots / "tradeoff.csv").read_text().startswith("variant,accuracy")


def test_every_mlflow_run_has_metrics_and_tags(finished, tmp_path):
    cfg, _, _ = finished
    runs = mlflow_runs(cfg.tracking.uri, cfg.tracking.experiment)
    stages = {r.data.tags["trimflow.stage"] for r in runs}
    assert stages == {"prepare", "tokenize", "finetune", "prune", "quantize", "evaluate", "report"}
    for run in runs:
        assert run.data.tags["dataset.digest"]
        assert "git.commit" in run.data.tags or "git.dirty" not in run.data.tags
        assert run.data.params["finetune.lr"]
    variants = [r for r in runs if "trimflow.variant" in r.data.tags]
    assert sorted(r.data.tags["trimflow.variant"] for r in variants) == sorted(VARIANTS)
    for run in variants:
        assert set(MLFLOW_NAMES.values()) <= set(run.data.metrics)
    finetune_run = next(r for r in runs if r.data.tags["trimflow.stage"] == "finetune")
    assert "train/loss" in finetune_run.data.metrics


def test_multirun_sweep_shares_upstream_and_nests_runs(tmp_path, tiny_encoder_dir):
    db = tmp_path / "mlflow.db"
    command = [
        sys.executable,
        "-m",
        "trimflow.cli",
        "pipeline",
        "-m",
        "experiment=smoke",
        f"model.name={tiny_encoder_dir}",
        "dataset.max_train_samples=80",
        "dataset.max_test_samples=24",
        "finetune.lr=1e-4,5e-4",
        "prune.sparsity=0.3,0.5",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    store = tmp_path / "outputs" / "store"
    kinds = sorted(p.name.split("-")[0] for p in store.iterdir() if p.name != "work")
    assert kinds.count("prepared") == 1 and kinds.count("tokenized") == 1
    assert kinds.count("finetuned") == 2 and kinds.count("pruned") == 4
    assert kinds.count("reports") == 4

    runs = mlflow_runs(f"sqlite:///{db}", "trimflow")
    sweeps = [r for r in runs if r.data.tags.get("trimflow.stage") == "sweep"]
    assert len(sweeps) == 1
    points = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweeps[0].info.run_id]
    assert len(points) == 4
