"""All stages in-process on a tiny BERT, and Hydra multirun sharing upstream work."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from helpers import mlflow_runs, smoke_pipeline_command

from trimflow.compress.variants import load_variant
from trimflow.config.schema import MERGEABLE_METHODS
from trimflow.evaluation.cost import TRAINING_FIELDS
from trimflow.evaluation.devices import variant_devices
from trimflow.evaluation.scoring import LabelScorer
from trimflow.evaluation.summary import mlflow_names
from trimflow.layout import dvc_layout
from trimflow.pipeline import run_pipeline
from trimflow.stages import run_stage
from trimflow.tracking.runs import FINISHED, HEADLINE_PREFIX, RECOMMENDED_TAG

# metrics.json field -> MLflow name, classification
# Overrides leaving one structured-pruned and two quantized variants (for the sweep).
LEAN = (
    "~prune.variants.sparse80",
    "~prune.variants.distilled_pruned",
    "~distill.students.distilled",
    "~distill.students.distilled_third",
    *(
        f"~quantize.variants.{name}"
        for name in (
            "quantized_emb",
            "bf16",
            "fp16",
            "onnx",
            "onnx_int8",
            "onnx_static_int8",
            "openvino",
            "openvino_int8",
            "distilled_onnx_int8",
            "distilled_pruned_onnx_int8",
            "distilled_pruned_int8",
            "distilled_pruned_openvino_int8",
        )
    ),
)


def mlflow_names_of(cfg) -> dict[str, str]:
    """metrics.json field -> MLflow name of every per-variant number evaluate writes for `cfg`."""
    return mlflow_names(LabelScorer.quality_keys, cfg.beyond_metrics())


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_encoder_dir, tracking_db):
    from trimflow.config.loading import compose_config

    root = tmp_path_factory.mktemp("pipeline")
    cfg = compose_config(
        [
            "experiment=smoke",
            f"model.name={tiny_encoder_dir}",
            f"tracking.uri={tracking_db}",
            f"tracking.experiment={root.name}",
            "dataset.max_train_samples=120",
            "dataset.max_test_samples=40",
        ]
    )
    layout = dvc_layout(root)
    run_pipeline(cfg, layout)
    metrics = json.loads(layout.metrics_file.read_text())
    return cfg, layout, metrics


def test_metrics_file_has_every_declared_variant_and_field(finished):
    cfg, _, metrics = finished
    assert list(metrics["variants"]) == list(cfg.variant_kinds())
    assert len(metrics["variants"]) == 28
    devices = variant_devices(cfg)
    for name, values in metrics["variants"].items():
        assert set(values) == {*mlflow_names_of(cfg), "device", "runtime", "worst_slice"}
        assert values["device"] == devices[name]
        assert (values["peak_gpu_mem_mb"] is None) == (devices[name] == "cpu")
        assert 0.0 <= values["accuracy"] <= 1.0
        assert values["latency_ms_p95"] >= values["latency_ms_p50"] > 0
        assert values["throughput_sps"] > 0 and values["size_mb"] > 0
    assert metrics["recommended"] in metrics["variants"]
    assert metrics["recommendation"]["variant"] == metrics["recommended"]


def test_every_variant_has_its_beyond_accuracy_figures_against_the_baseline(finished):
    cfg, layout, metrics = finished
    variants = metrics["variants"]
    baseline = variants[cfg.report.baseline]
    assert baseline["label_loyalty"] == 1.0 and baseline["flip_rate"] == 0.0
    assert baseline["probability_loyalty"] == pytest.approx(1.0)
    assert baseline["slice_gap_change"] == 0.0 and baseline["attribution_topk_overlap"] == 1.0
    for name, values in variants.items():
        for key in ("ece", "ece_calibrated", "brier", "label_loyalty", "worst_slice_accuracy"):
            assert 0.0 <= values[key] <= 1.0, (name, key)
        assert values["temperature"] > 0 and values["explain_ms"] > 0, name
        for kind in cfg.evaluate.robustness.perturbations:
            assert 0.0 <= values[f"accuracy_{kind}"] <= 1.0, (name, kind)
        assert values["worst_slice"].split("=")[0] in ("class", "length", "truncated"), name
        detail = json.loads((layout.variant_details / f"{name}.json").read_text())
        bins = detail["reliability_calibrated"]
        assert len(bins) == cfg.evaluate.calibration.bins
        assert sum(b["count"] for b in bins) == len(detail["predictions"])
        assert detail["flips"]["flips"] == round(values["flip_rate"] * len(detail["predictions"]))
        assert set(detail["slices"]["slicings"]) == {"class", "length", "truncated"}
        assert "logits" not in detail


def test_trained_variants_carry_their_cost_to_train_and_quantized_their_sources(finished):
    cfg, _, metrics = finished
    variants = metrics["variants"]
    finetuned = variants["finetuned"]
    assert finetuned["trainable_params"] == finetuned["train_total_params"] == finetuned["params"]
    assert finetuned["train_s"] > 0 and finetuned["train_samples_per_s"] > 0
    assert finetuned["peak_train_mem_mb"] > 0 and finetuned["adapter_mb"] is None
    for name, settings in cfg.quantize.variants.items():
        source = variants[settings.source]
        assert {key: variants[name][key] for key in TRAINING_FIELDS} == {
            key: source[key] for key in TRAINING_FIELDS
        }, name


def test_adapted_variants_train_a_sliver_and_their_merged_model_equals_the_adapter(finished):
    cfg, layout, metrics = finished
    variants = metrics["variants"]
    for name, spec in cfg.adapt.variants.items():
        values = variants[name]
        assert 0 < values["trainable_params"] < values["train_total_params"] / 100, name
        assert 0 < values["adapter_mb"] < variants["finetuned"]["size_mb"] / 10, name
        assert (layout.model_dir(name) / "adapter").is_dir()
        if spec.method not in MERGEABLE_METHODS:  # base model + adapter
            assert values["merge_agreement"] is None
            assert values["size_mb"] > variants["finetuned"]["size_mb"]
        else:
            assert values["merge_agreement"] == 1.0 and values["merge_max_abs_diff"] < 1e-4, name
    assert variants["lora_onnx_int8"]["adapter_mb"] is None  # a quantized copy is no adapter
    assert variants["lora_onnx_int8"]["agreement"] >= 0.8


def test_quantized_variants_agree_with_their_source(finished):
    _, _, metrics = finished
    variants = metrics["variants"]
    assert variants["finetuned"]["agreement"] == 1.0
    assert variants["onnx"]["agreement"] == 1.0  # fp32 ONNX Runtime == PyTorch
    for name in ("quantized", "onnx_int8", "onnx_static_int8", "bf16", "openvino_int8"):
        assert variants[name]["agreement"] >= 0.8, name
    assert variants["openvino"]["agreement"] == 1.0  # fp32, the same graph as onnx
    runtimes = {name: values["runtime"] for name, values in variants.items()}
    assert runtimes["openvino"] == runtimes["distilled_pruned_openvino_int8"] == "openvino"
    assert runtimes["onnx_int8"] == "onnxruntime" and runtimes["quantized"] == "torch"


def test_pruned_variants_are_smaller_as_declared(finished):
    _, layout, metrics = finished
    variants = metrics["variants"]
    pruning = json.loads((layout.model_dir("pruned") / "pruning.json").read_text())
    assert pruning["heads_removed"] == 4  # half of 2 x 4 heads
    assert pruning["ffn_neurons_removed"] == 64  # half of 2 x 64 neurons
    assert variants["pruned"]["params"] == pruning["params_after"] < variants["finetuned"]["params"]
    compound = json.loads((layout.model_dir("distilled_pruned") / "pruning.json").read_text())
    assert compound["params_before"] == variants["distilled"]["params"]  # the student, pruned
    assert compound["heads_removed"] == 2  # half of its 1 x 4 heads
    assert variants["distilled_pruned"]["params"] == compound["params_after"]
    model = load_variant(layout.model_dir("pruned_quantized"))
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads < 4
    sparse = json.loads((layout.model_dir("sparse80") / "pruning.json").read_text())
    assert sparse["encoder_linear_sparsity"] >= 0.5
    assert variants["sparse80"]["size_mb"] < variants["finetuned"]["size_mb"] / 3
    assert variants["quantized_emb"]["size_mb"] < variants["quantized"]["size_mb"]


def test_distilled_student_has_the_declared_layers(finished):
    _, layout, metrics = finished
    student = load_variant(layout.model_dir("distilled"))
    assert student.config.num_hidden_layers == 1
    assert metrics["variants"]["distilled"]["params"] < metrics["variants"]["finetuned"]["params"]


def test_report_is_self_contained_with_plots(finished):
    _, layout, metrics = finished
    page = (layout.reports / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 4
    assert f"Recommended: {metrics['recommended']}" in page
    assert 'src="http' not in page
    markdown = (layout.reports / "report.md").read_text()
    assert "plots/quality_vs_latency.png" in markdown
    assert (layout.plots / "tradeoff.csv").read_text().startswith("variant,quality")


def test_every_mlflow_run_has_metrics_and_tags(finished):
    cfg, _, metrics = finished
    runs = mlflow_runs(cfg.tracking.uri, cfg.tracking.experiment)
    stages = {r.data.tags["trimflow.stage"] for r in runs}
    assert stages == {
        "prepare",
        "tokenize",
        "finetune",
        "adapt",
        "prune",
        "distill",
        "quantize",
        "evaluate",
        "report",
    }
    built = {r.data.tags["trimflow.builds"] for r in runs if "trimflow.builds" in r.data.tags}
    assert built == set(cfg.variant_kinds()) - {"finetuned"}
    for run in runs:
        assert run.data.tags["dataset.digest"]
        assert "git.commit" in run.data.tags or "git.dirty" not in run.data.tags
        assert run.data.params["finetune.lr"]
    variants = [r for r in runs if "trimflow.variant" in r.data.tags]
    assert sorted(r.data.tags["trimflow.variant"] for r in variants) == sorted(cfg.variant_kinds())
    for run in variants:  # every number but the figures a variant lacks (None)
        values = metrics["variants"][run.data.tags["trimflow.variant"]]
        numbers = {k: v for k, v in values.items() if k not in ("device", "runtime", "worst_slice")}
        names = mlflow_names_of(cfg)
        logged = {names[key] for key, value in numbers.items() if value is not None}
        assert logged <= set(run.data.metrics)
        assert run.data.tags["trimflow.device"] == values["device"]
        assert run.data.tags["trimflow.runtime"] == values["runtime"]
        adapted = cfg.variant_kinds()[run.data.tags["trimflow.variant"]] == "adapt"
        assert ("training/adapter_mb" in run.data.metrics) == adapted
    finetune_run = next(r for r in runs if r.data.tags["trimflow.stage"] == "finetune")
    assert "train/loss" in finetune_run.data.metrics


def report_run_ids(cfg) -> set[str]:
    return {
        r.info.run_id
        for r in mlflow_runs(cfg.tracking.uri, cfg.tracking.experiment)
        if r.data.tags["trimflow.stage"] == "report"
    }


def registered_versions(uri: str, run_ids: set[str]) -> list:
    """Registry versions of trimflow-classification created by the runs `run_ids`."""
    from mlflow import MlflowClient

    versions = MlflowClient(uri).search_model_versions("name='trimflow-classification'")
    return [version for version in versions if version.run_id in run_ids]


def test_report_registers_the_recommended_variant_unless_turned_off(finished):
    cfg, layout, metrics = finished
    (version,) = registered_versions(cfg.tracking.uri, report_run_ids(cfg))
    assert version.tags["trimflow.variant"] == metrics["recommended"]

    quiet = cfg.model_copy(
        update={"tracking": cfg.tracking.model_copy(update={"register_model": False})}
    )
    run_stage("report", quiet, layout)
    assert len(report_run_ids(cfg)) == 2
    assert registered_versions(cfg.tracking.uri, report_run_ids(cfg)) == [version]


@pytest.mark.slow
def test_multirun_sweep_shares_upstream_and_nests_runs(tmp_path, tiny_encoder_dir):
    db = tmp_path / "mlflow.db"
    command = smoke_pipeline_command(
        tiny_encoder_dir,
        *LEAN,
        "finetune.lr=1e-4,5e-4",
        "prune.variants.pruned.ffn_fraction=0.25,0.5",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        multirun=True,
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True)
    store = tmp_path / "outputs" / "store"
    kinds = sorted(
        p.name.split("-")[0] for p in store.iterdir() if p.name not in ("work", "models")
    )
    assert kinds.count("prepared") == 1 and kinds.count("tokenized") == 1
    assert kinds.count("reports") == 4
    models = sorted(p.name.split("-")[0] for p in (store / "models").iterdir())
    assert models.count("finetuned") == 2 and models.count("pruned") == 4
    assert models.count("quantized") == 2 and models.count("pruned_quantized") == 4

    runs = mlflow_runs(f"sqlite:///{db}", "trimflow")
    sweeps = [r for r in runs if r.data.tags.get("trimflow.stage") == "sweep"]
    assert len(sweeps) == 1
    points = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweeps[0].info.run_id]
    assert len(points) == 4
    for point in points:  # named by their overrides, with the headline on the run itself
        assert "finetune.lr=" in point.info.run_name and point.info.status == FINISHED
        assert RECOMMENDED_TAG in point.data.tags
        assert f"{HEADLINE_PREFIX}speedup" in point.data.metrics


@pytest.mark.slow
def test_optuna_search_maximises_the_validation_score_and_resumes_by_config_hash(
    tmp_path, tiny_encoder_dir
):
    db = tmp_path / "mlflow.db"
    sweep_dir = tmp_path / "optuna"
    command = smoke_pipeline_command(
        tiny_encoder_dir,
        "hparams_search=finetune",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep_dir}",
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}"}

    def search() -> str:
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    search()
    models = tmp_path / "outputs" / "store" / "models"
    trained = sorted(p.name for p in models.iterdir())
    assert len(trained) == 3 and all(name.startswith("finetuned-") for name in trained)

    runs = mlflow_runs(f"sqlite:///{db}", "trimflow")
    points = [r for r in runs if "search/validation" in r.data.metrics]
    assert len(points) == 3
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == max(r.data.metrics["search/validation"] for r in points)

    output = search()  # an interrupted or repeated search: same seed, same trials
    assert output.count("finetune: up to date") == 3
    assert sorted(p.name for p in models.iterdir()) == trained
