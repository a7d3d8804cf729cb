"""The smoke pipeline through real `dvc repro` in a temporary copy of the project."""

from __future__ import annotations

import json
import re
import time

import pandas as pd
import pytest
from helpers import E2E_SMOKE, copy_project, dvc_set, mlflow_runs, project_env, shell
from seqeval.metrics import f1_score

from trimflow.config.loading import compose_config
from trimflow.layout import stage_units, unit_name
from trimflow.tracking.runs import COMMIT_TAG, FINISHED, HEADLINE_PREFIX, RECOMMENDED_TAG

SMOKE = compose_config(list(E2E_SMOKE))
UNITS = [unit_name(stage, variant) for stage, variant in stage_units(SMOKE)]
# The NER smoke run: a higher learning rate and 3 epochs so the model finds some entities.
NER_SMOKE = [*E2E_SMOKE, "task=ner", "finetune.lr=5e-4", "finetune.max_epochs=3"]
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A git-initialised copy of the project with params.yaml composed for the smoke preset
    (less the variants E2E_LEAN leaves out)."""
    copy = tmp_path_factory.mktemp("project")
    copy_project(copy)
    sh = shell(copy, project_env(copy))
    sh("git", "init", "-q")
    sh("trimflow", "params", *E2E_SMOKE)
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "copy")
    first_run = sh("trimflow", "repro")
    return copy, sh, first_run


def ran_stages(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w@]+)'", output)


def test_first_repro_runs_every_stage_and_writes_outputs(project):
    copy, _, output = project
    assert sorted(ran_stages(output)) == sorted(UNITS)
    assert ran_stages(output)[:3] == ["prepare", "tokenize", "finetune"]
    assert ran_stages(output)[-2:] == ["evaluate", "report"]
    metrics = json.loads((copy / "reports/metrics.json").read_text())
    assert list(metrics["variants"]) == list(SMOKE.variant_kinds())
    assert metrics["recommended"] in metrics["variants"]
    assert (copy / "reports/report.html").stat().st_size > 10_000
    # `trimflow repro` closes with the recommendation and where the report is.
    assert f"recommended {metrics['recommended']}: " in output
    assert f"report: {copy.resolve() / 'reports/report.html'}" in output
    lock = (copy / "dvc.lock").read_text()
    assert all(f"  {unit}:" in lock for unit in UNITS)
    assert not list(copy.glob("**/.*.tmp-*")), "temporary stage outputs were left behind"


def test_second_repro_runs_nothing(project):
    _, sh, _ = project
    output = sh("dvc", "repro")
    assert ran_stages(output) == []


def stale_after_editing(project, path: str) -> set[str]:
    """The stage units `dvc status` names once a comment is appended to `path` (then undone)."""
    copy, sh, _ = project
    with (copy / path).open("a") as handle:
        handle.write("# edited\n")
    try:
        status, _ = json.JSONDecoder().raw_decode(sh("dvc", "status", "--json"))
        return set(status)
    finally:
        sh("git", "checkout", "--", path)


def test_editing_code_makes_stale_the_stages_that_run_it_and_nothing_upstream(project):
    """dvc.yaml's code deps at work: only evaluate runs the NER baselines; the training recipe
    runs in finetune, the adapters, pruning recovery and distillation. (Stages downstream of
    those rerun only if their outputs change.)"""
    assert stale_after_editing(project, "src/trimflow/evaluation/baselines.py") == {"evaluate"}
    training = {
        unit_name(stage, variant)
        for stage, variant in stage_units(SMOKE)
        if stage in ("finetune", "adapt", "prune", "distill")
    }
    assert stale_after_editing(project, "src/trimflow/models/recipe.py") == training
    # Allowlisted (MLflow logging): no stage. Also shows that the edits above were undone.
    assert stale_after_editing(project, "src/trimflow/tracking/runs.py") == set()


def test_every_mlflow_run_of_the_repro_is_nested_and_tagged(project):
    copy, _, _ = project
    runs = mlflow_runs(f"sqlite:///{copy / 'mlflow.db'}", "trimflow")
    parents = [r for r in runs if r.data.tags.get("trimflow.stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]  # named by its commit, ended FINISHED, with the headline
    metrics = json.loads((copy / "reports/metrics.json").read_text())
    assert parent.info.status == FINISHED
    assert parent.info.run_name.startswith(parent.data.tags[COMMIT_TAG][:7])
    assert parent.data.tags[RECOMMENDED_TAG] == metrics["recommended"]
    assert parent.data.metrics[f"{HEADLINE_PREFIX}speedup"] == pytest.approx(
        metrics["recommendation"]["speedup"]
    )
    children = [r for r in runs if r is not parents[0]]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    stage_runs = [r for r in children if "trimflow.variant" not in r.data.tags]
    assert sorted(r.data.tags["dvc.stage"] for r in stage_runs) == sorted(UNITS)
    for run in children:
        assert run.data.tags["git.commit"] and run.data.tags["dataset.digest"]
        assert run.data.tags["dvc.lock_hash"] if run in stage_runs else run.data.metrics


@pytest.mark.slow
def test_dvc_exp_run_with_one_variant_override_reruns_only_that_variant_onwards(project):
    copy, sh, _ = project
    override = "prune.variants.pruned.ffn_fraction=0.25"
    output = sh("dvc", "exp", "run", *dvc_set(E2E_SMOKE), "-S", override)
    ran = ran_stages(output)
    assert ran[0] == "prune@pruned" and ran[-2:] == ["evaluate", "report"]
    assert sorted(ran[1:-2]) == sorted(
        f"quantize@{name}"
        for name, spec in SMOKE.quantize.variants.items()
        if spec.source == "pruned"
    )
    assert "ffn_fraction: 0.25" in (copy / "params.yaml").read_text()


@pytest.mark.slow
def test_ner_experiment_runs_every_stage_and_reports_seqeval_of_its_saved_predictions(project):
    copy, sh, _ = project
    output = sh("dvc", "exp", "run", *dvc_set(NER_SMOKE))
    ner = compose_config(NER_SMOKE)
    assert sorted(ran_stages(output)) == sorted(unit_name(*unit) for unit in stage_units(ner))
    metrics = json.loads((copy / "reports/metrics.json").read_text())
    assert (metrics["task"], metrics["metric"]) == ("ner", "f1")
    assert list(metrics["variants"]) == list(ner.variant_kinds())

    gold = pd.read_parquet(copy / "data/prepared/test.parquet")["tags"].map(list).tolist()
    details = json.loads((copy / "reports/variants/baselines.json").read_text())
    for variant in metrics["variants"]:
        details[variant] = json.loads((copy / f"reports/variants/{variant}.json").read_text())
    for name, scores in {**metrics["variants"], **metrics["baselines"]}.items():
        assert f1_score(gold, details[name]["predictions"]) == scores["f1"], name
    assert metrics["variants"]["finetuned"]["f1"] > 0  # the comparison above is not vacuous

    report = (copy / "reports/report.md").read_text()
    assert "## Entity F1 per type" in report and "| gazetteer |" in report
    assert (copy / "reports/plots/confusion_finetuned.png").is_file()


def experiment_points(shown) -> dict[float, dict]:
    """finetune.lr -> metrics.json data of every revision in `dvc exp show --json` output."""
    found = {}
    if isinstance(shown, list):
        for item in shown:
            found.update(experiment_points(item))
    elif isinstance(shown, dict):
        data = shown.get("data") or {}
        params = data.get("params", {}).get("params.yaml", {}).get("data", {})
        metrics = data.get("metrics", {}).get("reports/metrics.json", {}).get("data")
        if metrics and "finetune" in params:
            found[float(params["finetune"]["lr"])] = metrics
        for experiment in shown.get("experiments") or []:
            found.update(experiment_points(experiment.get("revs", [])))
    return found


@pytest.mark.slow
def test_queued_dvc_experiments_run_and_dvc_exp_show_lists_them(project):
    _, sh, _ = project
    sh("dvc", "exp", "run", "--queue", *dvc_set(E2E_SMOKE), "-S", "finetune.lr=2e-5,5e-5")
    sh("dvc", "queue", "start", "--jobs", "1")
    try:
        deadline = time.monotonic() + 1800
        while re.search(r"\b(Queued|Running)\b", sh("dvc", "queue", "status")):
            assert time.monotonic() < deadline, "queued experiments did not finish in 30 min"
            time.sleep(10)
    finally:
        # The worker stops by itself once idle, unless its idle monitor died (dvc-task's
        # filesystem broker can hand it a half-written message): stop it in any case.
        sh("dvc", "queue", "stop")
    assert "Failed" not in sh("dvc", "queue", "status")
    points = experiment_points(json.loads(sh("dvc", "exp", "show", "--json")))
    assert {2e-5, 5e-5} <= set(points)
    for lr in (2e-5, 5e-5):
        assert points[lr]["recommended"] in points[lr]["variants"]
