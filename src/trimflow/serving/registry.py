"""Register the recommended variant and move the `champion` alias only when it scores higher."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from trimflow.config.schema import TrimflowConfig
from trimflow.evaluation.calibration import served_temperature
from trimflow.layout import Layout
from trimflow.serving.pyfunc import log_variant_model
from trimflow.tracking.runs import OBJECTIVE_TAG, VARIANT_TAG, tracking_uri

CHAMPION = "champion"
LOGGED_MODEL_URI = re.compile(r"models:/(m-[0-9a-f]+)")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistrationResult:
    """The version created, whether it became the champion, and the champion before it."""

    model_name: str
    version: int
    promoted: bool
    previous_champion: int | None


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    try:
        client.create_registered_model(model_name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def registered_model_name(task: str) -> str:
    """The registered model of a task's recommended variants: `trimflow-<task>`."""
    return f"trimflow-{task}"


def champion_uri(task: str) -> str:
    """The MLflow URI of a task's champion: `models:/trimflow-<task>@champion`."""
    return f"models:/{registered_model_name(task)}@{CHAMPION}"


def current_champion(client: MlflowClient, model_name: str) -> ModelVersion | None:
    """The version the `champion` alias points at, if any."""
    version = client.get_registered_model(model_name).aliases.get(CHAMPION)
    return None if version is None else client.get_model_version(model_name, version)


def champion_objective(champion: ModelVersion) -> float:
    """The champion's objective tag; NaN (never beaten) when someone set the alias by hand."""
    return float(champion.tags.get(OBJECTIVE_TAG, math.nan))


def register_recommended(
    client: MlflowClient,
    run_id: str,
    model_uri: str,
    model_name: str,
    objective: float,
    variant: str,
) -> RegistrationResult:
    """Register `model_uri` as a new version of `model_name`, tagged with its objective and
    variant; move `champion` to it only if its objective is strictly higher (or none exists)."""
    _ensure_registered_model(client, model_name)
    logged = LOGGED_MODEL_URI.fullmatch(model_uri)
    created = client.create_model_version(
        model_name,
        source=model_uri,
        run_id=run_id,
        tags={OBJECTIVE_TAG: repr(float(objective)), VARIANT_TAG: variant},
        model_id=logged.group(1) if logged else None,
    )
    champion = current_champion(client, model_name)
    promoted = champion is None or objective > champion_objective(champion)
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION, created.version)
    return RegistrationResult(
        model_name=model_name,
        version=int(created.version),
        promoted=promoted,
        previous_champion=None if champion is None else int(champion.version),
    )


def publish_recommended(
    cfg: TrimflowConfig, layout: Layout, metrics: dict, run_id: str
) -> RegistrationResult:
    """Log the recommended variant as a pyfunc in the active run `run_id` and register it as
    `trimflow-<task>`, its objective being its task metric in `metrics`."""
    variant = metrics["recommended"]
    objective = metrics["variants"][variant][metrics["metric"]]
    model_name = registered_model_name(cfg.task.type)
    info = log_variant_model(
        layout.model_dir(variant),
        max_length=cfg.model.max_length,
        temperature=served_temperature(metrics, variant),
    )
    client = MlflowClient(tracking_uri(cfg.tracking))
    result = register_recommended(client, run_id, info.model_uri, model_name, objective, variant)
    outcome = (
        f"now the {CHAMPION}"
        if result.promoted
        else f"not promoted, the {CHAMPION} stays version {result.previous_champion}"
    )
    log.info(
        "registered %s version %d (%s, %s %.4f): %s",
        model_name,
        result.version,
        variant,
        metrics["metric"],
        objective,
        outcome,
    )
    return result
