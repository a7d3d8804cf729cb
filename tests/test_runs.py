"""What the MLflow runs say: end statuses, runs left RUNNING, experiment kind, names, headline."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trimflow.tracking.runs import (
    BUILDS_TAG,
    DATA_PREFIX,
    DVC_STAGE_TAG,
    EXPERIMENT_KIND_TAG,
    FAILED,
    FINISHED,
    HEADLINE_PREFIX,
    KILLED,
    LOCK_HASH_TAG,
    MODEL_TRAINING_KIND,
    PARENT_RUN_ENV,
    PARENT_TAG,
    PIPELINE,
    RECOMMENDED_TAG,
    RUNNING,
    STAGE_TAG,
    TRAINING_PREFIX,
    VARIANT_TAG,
    CommandFailed,
    Tracker,
    changed_params,
    end_status,
    log_variant_run,
    run_name,
)
from trimflow.utils.interrupt import StageInterrupted

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}


@pytest.fixture
def clean_env(monkeypatch):
    """No pipeline run inherited; MLFLOW_TRACKING_URI (which MLflow exports) restored after."""
    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key, value in GIT_IDENTITY.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


@pytest.fixture
def tracker(tiny_config, clean_env):
    return Tracker(tiny_config())


# evaluate's metrics.json, reduced to what a pipeline's headline reads.
EVALUATED = {
    "recommendation": {
        "variant": "q",
        "objective": "latency",
        "baseline": "finetuned",
        "speedup": 3.0,
        "size_ratio": 4.0,
        "guards": ["accuracy"],
        "drop_pts": {"accuracy": 0.5},
    },
    "variants": {"q": {"accuracy": 0.9}},
}


def status(tracker: Tracker, run_id: str) -> str:
    return tracker.client().get_run(run_id).info.status


def open_run(tracker: Tracker, stage: str, parent: str | None = None, builds: str | None = None):
    """A RUNNING run as a process killed with SIGKILL leaves it; returns its id."""
    tags = {STAGE_TAG: stage}
    if parent:
        tags[PARENT_TAG] = parent
    if builds:
        tags[BUILDS_TAG] = builds
    return tracker.client().create_run(tracker.experiment_id, tags=tags).info.run_id


def git_repo(path: Path) -> str:
    """`path` as a git repository with everything in it committed; returns the short commit."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=path, check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "test")
    return git("rev-parse", "--short=7", "HEAD")


# --- end statuses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (None, FINISHED),
        (ValueError("broken"), FAILED),
        (StageInterrupted(signal.SIGTERM), KILLED),
        (KeyboardInterrupt(), KILLED),
    ],
)
def test_a_stage_run_ends_with_the_status_of_its_block(tracker, error, expected):
    expectation = pytest.raises(type(error)) if error else contextlib.nullcontext()
    with expectation, tracker.stage_run("finetune") as active:
        run_id = active.info.run_id
        if error:
            raise error
    assert status(tracker, run_id) == expected


@pytest.mark.parametrize(
    ("code", "signalled", "exit_code"),
    [(1, False, 1), (255, False, 255), (253, False, 253), (-15, True, 143), (130, True, 130)]
    + [(143, True, 143), (252, True, 252)],
)
def test_an_exit_status_tells_a_failure_from_a_signal(code, signalled, exit_code):
    failed = CommandFailed("dvc repro", code)
    assert (failed.signalled, failed.exit_code) == (signalled, exit_code)
    assert end_status(failed) == (KILLED if signalled else FAILED)


# --- runs left RUNNING -------------------------------------------------------------------------


def test_a_pipeline_run_closes_the_child_runs_left_running(tracker):
    with pytest.raises(ValueError), tracker.pipeline_run("pipeline") as parent:
        child = open_run(tracker, "finetune", parent.info.run_id)
        raise ValueError("a stage failed")
    assert status(tracker, parent.info.run_id) == FAILED
    assert status(tracker, child) == KILLED


def test_the_next_run_of_a_stage_closes_its_dead_runs_only(tracker):
    client = tracker.client()
    ended = open_run(tracker, PIPELINE)
    client.set_terminated(ended, FAILED)
    alive = open_run(tracker, PIPELINE)  # e.g. a sweep point running in parallel
    dead = open_run(tracker, "prune", ended, builds="pruned")
    concurrent = open_run(tracker, "prune", alive, builds="pruned")
    other_variant = open_run(tracker, "prune", ended, builds="sparse80")
    other_stage = open_run(tracker, "finetune", ended)
    without_parent = open_run(tracker, "prune", builds="pruned")
    with tracker.stage_run("prune", builds="pruned"):
        pass
    assert status(tracker, dead) == KILLED
    for run_id in (concurrent, other_variant, other_stage, without_parent):
        assert status(tracker, run_id) == RUNNING
    with tracker.pipeline_run("pipeline") as parent:
        earlier = open_run(tracker, "finetune", parent.info.run_id)
        with tracker.stage_run("finetune"):
            assert status(tracker, earlier) == KILLED  # same pipeline: an earlier attempt
    assert status(tracker, other_stage) == KILLED  # its pipeline had ended


# --- the experiment and the pipeline runs ------------------------------------------------------


def test_the_experiment_opens_as_model_training_new_or_existing(tiny_config, clean_env):
    created = Tracker(tiny_config())
    client = created.client()
    assert client.get_experiment(created.experiment_id).tags == {
        EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND
    }
    name = f"{created.cfg.tracking.experiment}-older"
    older = client.create_experiment(name)  # as trimflow created them before the tag
    Tracker(tiny_config(f"tracking.experiment={name}"))
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND


def test_changed_params_read_as_hydra_overrides():
    params = {"a": {"b": 1, "c": [1, 2], "s": "x"}, "new": None, "d": True}
    defaults = {"a": {"b": 2, "c": [1, 2], "s": "y"}, "d": True, "gone": {"e": 1}}
    assert changed_params(params, defaults) == ["a.b=1", "a.s=x", "+new=null", "~gone"]


def test_run_names_start_with_the_commit(tmp_path, clean_env):
    (tmp_path / "file").write_text("one")
    commit = git_repo(tmp_path)
    clean_env.chdir(tmp_path)
    assert run_name(["finetune.lr=1e-4", "task=ner"]) == f"{commit} finetune.lr=1e-4 task=ner"
    assert run_name([]) == f"{commit} defaults"
    (tmp_path / "file").write_text("two")
    assert run_name([]) == f"{commit}-dirty defaults"
    long = run_name(["a" * 200, "b" * 200])
    assert len(long) == 250 and long.startswith(f"{commit}-dirty aaa") and long.endswith("bbb")
    assert "a…b" in long


def test_the_headline_of_a_pipeline_is_logged_on_its_run(tracker, tmp_path):
    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text(json.dumps(EVALUATED))
    with tracker.pipeline_run("pipeline") as parent:
        tracker.log_headline(metrics_file)
    run = tracker.client().get_run(parent.info.run_id)
    assert run.data.tags[RECOMMENDED_TAG] == "q"
    assert {k: v for k, v in run.data.metrics.items() if k.startswith(HEADLINE_PREFIX)} == {
        f"{HEADLINE_PREFIX}speedup": 3.0,
        f"{HEADLINE_PREFIX}size_ratio": 4.0,
        f"{HEADLINE_PREFIX}accuracy": 0.9,
    }


def test_a_variant_run_logs_its_numbers_but_not_the_figures_it_lacks(tracker):
    metrics = {"test/accuracy": 0.9, f"{TRAINING_PREFIX}train_s": None}
    with tracker.stage_run("evaluate") as stage_run:
        log_variant_run(tracker, "pruned", metrics, stage_run, [], "cpu", "torch")
    (run,) = tracker.client().search_runs(
        [tracker.experiment_id], f"tags.`{VARIANT_TAG}` = 'pruned'"
    )
    assert run.data.metrics == {"test/accuracy": 0.9}
    assert run.data.tags["trimflow.device"] == "cpu"
    assert run.data.tags["trimflow.runtime"] == "torch"
    assert run.info.status == FINISHED


def test_the_stage_runs_of_a_pipeline_are_tagged_by_their_dvc_stage(tracker):
    with tracker.pipeline_run("pipeline") as parent:
        finetune, prune, outside = (
            open_run(tracker, stage, parent.info.run_id) for stage in ("finetune", "prune", "x")
        )
        client = tracker.client()
        client.set_tag(finetune, DVC_STAGE_TAG, "finetune")
        client.set_tag(prune, DVC_STAGE_TAG, "prune@pruned")
        tracker.tag_dvc_stage_runs(LOCK_HASH_TAG, {"finetune": "f1", "prune@pruned": "p1"})
    tags = {run_id: client.get_run(run_id).data.tags for run_id in (finetune, prune, outside)}
    assert tags[finetune][LOCK_HASH_TAG] == "f1" and tags[prune][LOCK_HASH_TAG] == "p1"
    assert LOCK_HASH_TAG not in tags[outside]  # no DVC stage


def test_without_tracking_a_stage_logs_nothing(tiny_config, clean_env, tmp_path):
    tracker = Tracker(tiny_config("tracking.enabled=false"))
    with tracker.stage_run("report") as active:
        tracker.log_metrics({"rows": 1}, DATA_PREFIX)
        tracker.log_dict({"a": 1}, "card.json")
        tracker.log_artifacts(tmp_path)
        tracker.log_headline(tmp_path / "absent.json")
    assert active is None


# --- trimflow repro ----------------------------------------------------------------------------


def dvc_project(path: Path, cfg, stages: dict | None) -> str:
    """A git repository holding params.yaml for `cfg` (a DVC project of `stages`, if given);
    returns its short commit."""
    (path / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    if stages:
        (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
        subprocess.run(
            [sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=path, check=True
        )
    return git_repo(path)


def pipeline_runs(tracker: Tracker) -> list:
    return tracker.client().search_runs(
        [tracker.experiment_id], f"tags.`{STAGE_TAG}` = '{PIPELINE}'"
    )


def test_a_failing_dvc_repro_ends_its_run_failed(tiny_config, clean_env, tmp_path):
    from trimflow.pipeline import dvc_repro

    cfg = tiny_config()
    commit = dvc_project(tmp_path, cfg, None)  # no DVC project: `dvc repro` fails
    clean_env.chdir(tmp_path)
    assert dvc_repro([]) != 0
    (run,) = pipeline_runs(Tracker(cfg))
    assert run.info.status == FAILED
    assert run.info.run_name.startswith(f"{commit} ")
    assert " dataset.max_test_samples=40 " in run.info.run_name  # differs from conf/


def test_a_finished_dvc_repro_carries_its_name_and_headline(
    tiny_config, clean_env, tmp_path, caplog
):
    from trimflow.pipeline import dvc_repro

    caplog.set_level(logging.INFO)
    cfg = tiny_config()
    (tmp_path / "headline.json").write_text(json.dumps(EVALUATED))
    evaluate = {
        "cmd": "mkdir -p reports && cp headline.json reports/metrics.json",
        "deps": ["headline.json"],
        "outs": [{"reports/metrics.json": {"cache": False}}],
    }
    commit = dvc_project(tmp_path, cfg, {"evaluate": evaluate})
    clean_env.chdir(tmp_path)
    assert dvc_repro(["evaluate"]) == 0
    (run,) = pipeline_runs(Tracker(cfg))
    assert run.info.status == FINISHED
    assert run.info.run_name.startswith(f"{commit} dvc repro evaluate dataset.")
    assert run.data.tags[RECOMMENDED_TAG] == "q"
    assert run.data.metrics[f"{HEADLINE_PREFIX}speedup"] == 3.0
    assert (
        "recommended q: 3.00x faster at batch 1 and 4.00x smaller than finetuned"
        " (accuracy -0.50 pts)" in caplog.text
    )
    (tmp_path / "headline.json").write_text("{}")  # evaluate is stale, `--dry` runs nothing
    assert dvc_repro(["--dry"]) == 0
    (dry,) = [r for r in pipeline_runs(Tracker(cfg)) if r.info.run_id != run.info.run_id]
    assert dry.info.status == FINISHED and RECOMMENDED_TAG not in dry.data.tags


def test_a_dvc_repro_killed_by_a_signal_ends_its_run_killed(tiny_config, clean_env, tmp_path):
    from trimflow.pipeline import dvc_repro

    cfg = tiny_config()
    dvc_project(tmp_path, cfg, {"work": {"cmd": "kill -TERM $PPID"}})  # the stage kills dvc
    clean_env.chdir(tmp_path)
    assert dvc_repro([]) == 128 + signal.SIGTERM
    (run,) = pipeline_runs(Tracker(cfg))
    assert run.info.status == KILLED


def test_trimflow_repro_stopped_by_sigterm_ends_its_run_killed(tiny_config, clean_env, tmp_path):
    cfg = tiny_config()
    dvc_project(tmp_path, cfg, {"work": {"cmd": "touch started && sleep 60"}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.uri}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    wrapper = subprocess.Popen(
        [sys.executable, "-m", "trimflow.cli", "repro"], cwd=tmp_path, env=env
    )
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "started").exists():
            assert wrapper.poll() is None and time.monotonic() < deadline, "the stage never ran"
            time.sleep(0.2)
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        wrapper.kill()
    (run,) = pipeline_runs(Tracker(cfg))
    assert run.info.status == KILLED
