"""The MLflow UI in a real headless Chromium: the smoke run's child runs and their metrics.

Runs the smoke pipeline on the tiny BERT under one parent run into a fresh sqlite store, serves
it with `mlflow ui` on 127.0.0.1, opens the experiment, which must land on its runs table (the
"Training runs" tab), and reads that table. Skipped where Chromium, chromedriver or selenium is
missing: `make ui-test` installs them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import E2E_SMOKE, headless_chromium

from trimflow.serving.server import LocalMlflowServer
from trimflow.tracking.runs import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND


def _executable(name: str) -> str | None:
    """`name` on PATH, else Debian's /usr/bin/`name`; None when neither is executable."""
    path = shutil.which(name) or f"/usr/bin/{name}"
    return path if os.access(path, os.X_OK) else None


pytestmark = pytest.mark.slow
CHROMIUM = _executable("chromium")
CHROMEDRIVER = _executable("chromedriver")
MISSING = [
    name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not path
]
if MISSING:
    pytest.skip(
        f"{' and '.join(MISSING)} not installed (neither on PATH nor in /usr/bin); "
        "`make ui-test` installs Chromium and chromedriver and runs this test",
        allow_module_level=True,
    )
pytest.importorskip(
    "selenium", reason="selenium is not installed (pip install -r requirements.lock)"
)

TIMEOUT_S = 60
# The MLflow UI's GenAI / Model training switch, set to Model training by the URL.
MODEL_TRAINING_UI = "workflowType=machine_learning"
# Compared per variant row: the accuracy, and a metric whose value differs between variants.
METRICS = ("test/accuracy", "model/size_mb")


@pytest.fixture(scope="module")
def smoke_store(tmp_path_factory, tiny_encoder_dir):
    """The smoke pipeline, under one `pipeline` parent run, in a fresh sqlite store."""
    from trimflow.config.loading import compose_config
    from trimflow.layout import dvc_layout
    from trimflow.pipeline import run_pipeline
    from trimflow.tracking.runs import Tracker

    root = tmp_path_factory.mktemp("mlflow-ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = compose_config(
        [
            *E2E_SMOKE,
            f"model.name={tiny_encoder_dir}",
            f"tracking.uri={uri}",
            f"tracking.experiment={root.name}",
            "dataset.max_train_samples=120",
            "dataset.max_test_samples=40",
        ]
    )
    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI: put back the session's value.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with Tracker(cfg).pipeline_run("smoke"):
            run_pipeline(cfg, dvc_layout(root / "work"))
    return cfg, root


class MlflowUi(LocalMlflowServer):
    """`mlflow ui` over one backend store: one worker, no huey job workers (read-only UI)."""

    start_timeout_s = TIMEOUT_S

    def __init__(self, store_uri: str, workdir: Path) -> None:
        env = {
            "MLFLOW_TRACKING_URI": store_uri,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        super().__init__(workdir, env)
        self.store_uri = store_uri

    def arguments(self) -> list[str]:
        return ["ui", "--backend-store-uri", self.store_uri, "--workers", "1"]


@pytest.fixture(scope="module")
def mlflow_ui(smoke_store):
    """The base URL of `mlflow ui` serving the smoke store on a free port of 127.0.0.1."""
    cfg, root = smoke_store
    with MlflowUi(cfg.tracking.uri, root / "mlflow-ui") as server:
        yield server.url


@pytest.fixture(scope="module")
def browser(smoke_store):
    """Headless Chromium driven by Debian's chromedriver; tall enough to render every row."""
    _, root = smoke_store
    # tall enough that the table, which virtualises rows, shows 35 runs on one screen
    with headless_chromium(
        CHROMIUM, CHROMEDRIVER, "1920,2400", root / "chromedriver.log", TIMEOUT_S
    ) as driver:
        yield driver


def _run_name_text(driver, run_id: str) -> str:
    """The run name linked from the Run Name cell of `run_id`'s table row ('' while not
    rendered)."""
    from selenium.webdriver.common.by import By

    links = driver.find_elements(
        By.CSS_SELECTOR, f"[role=row][row-id='{run_id}'] [col-id*='Run Name'] a[href$='/{run_id}']"
    )
    return links[0].get_attribute("textContent").strip() if links else ""


def _show_metric_column(driver, wait, metric: str) -> None:
    """Tick `metric` in the runs table's "Columns" selector."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec

    wait.until(
        ec.element_to_be_clickable((By.CSS_SELECTOR, "[data-testid=column-selection-dropdown]"))
    ).click()
    search = wait.until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, "input[placeholder='Search columns']"))
    )
    search.send_keys(Keys.CONTROL, "a")
    search.send_keys(Keys.DELETE, metric)
    leaf = (
        By.XPATH,
        "//*[@data-testid='column-selector-tree']"
        f"//span[contains(@class, 'tree-title')][normalize-space(.)='{metric}']",
    )
    wait.until(ec.element_to_be_clickable(leaf)).click()
    search.send_keys(Keys.ESCAPE)
    wait.until(
        ec.invisibility_of_element_located((By.CSS_SELECTOR, "[data-testid=column-selector-tree]"))
    )


def test_experiment_opens_on_its_runs_table_listing_the_child_runs_and_metrics(
    smoke_store, mlflow_ui, browser
):
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    cfg, root = smoke_store
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("trimflow.stage") == "pipeline"]
    variants = {
        r.data.tags["trimflow.variant"]: r for r in runs if "trimflow.variant" in r.data.tags
    }
    assert sorted(variants) == sorted(cfg.variant_kinds())
    for run in variants.values():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id

    wait = WebDriverWait(browser, TIMEOUT_S)
    try:
        # The experiment link of docs/how-to/tracking.md opens on the runs table, not on the
        # (empty) GenAI overview where a fresh browser lands: MLflow 3.17 routes on its GenAI /
        # Model training switch, not on the experiment kind tag trimflow sets.
        assert experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
        browser.get(f"{mlflow_ui}/#/experiments/{experiment.experiment_id}?{MODEL_TRAINING_UI}")
        wait.until(lambda d: _run_name_text(d, parent.info.run_id) == "smoke")
        route = browser.current_url.split("#", 1)[1].split("?")[0]
        assert route == f"/experiments/{experiment.experiment_id}/runs"
        assert _run_name_text(browser, variants["finetuned"].info.run_id) == ""  # collapsed
        # The parent row's +/- button (in its Run Name cell) unfolds its child runs.
        expand = (
            By.CSS_SELECTOR,
            f"[role=row][row-id='{parent.info.run_id}'] [col-id*='Run Name'] button",
        )
        wait.until(ec.element_to_be_clickable(expand)).click()
        wait.until(
            lambda d: all(_run_name_text(d, r.info.run_id) for r in variants.values()),
            "the variant runs did not appear under the expanded parent run",
        )
        for name, run in variants.items():
            assert _run_name_text(browser, run.info.run_id) == f"variant:{name}"

        for metric in METRICS:
            _show_metric_column(browser, wait, metric)
            for name, run in variants.items():
                cell = wait.until(
                    ec.presence_of_element_located(
                        (
                            By.CSS_SELECTOR,
                            f"[role=row][row-id='{run.info.run_id}'] "
                            f"[role=gridcell][col-id='metrics.`{metric}`']",
                        )
                    )
                )
                browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", cell)
                assert cell.is_displayed(), (name, metric)
                shown = cell.get_attribute("textContent").strip()
                assert float(shown) == pytest.approx(run.data.metrics[metric], rel=1e-3), (
                    name,
                    metric,
                    shown,
                )
    except Exception:
        browser.save_screenshot(str(root / "mlflow-ui.png"))
        print(f"screenshot: {root / 'mlflow-ui.png'}; server log: {root / 'mlflow-ui.log'}")
        raise
