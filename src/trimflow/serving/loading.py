"""What `trimflow serve` and `trimflow predict` load: a variant directory of this project, or a
logged or registered trimflow model (by default the task's champion)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from trimflow.config.schema import TrimflowConfig
from trimflow.evaluation.calibration import served_temperature
from trimflow.layout import dvc_layout
from trimflow.serving.pyfunc import VariantModel
from trimflow.serving.registry import champion_uri
from trimflow.tracking.runs import tracking_uri
from trimflow.utils.atomic import read_json

log = logging.getLogger(__name__)
MODELS_SCHEME = "models:/"


class ModelLoadError(RuntimeError):
    """The model could not be loaded."""


@dataclass(frozen=True)
class ModelSource:
    """What to serve or score with: `name` for logs and summaries (a variant, or a model URI
    whose alias is pinned to the version it points at) and how to `load` it."""

    name: str
    load: Callable[[], VariantModel]


def model_source(cfg: TrimflowConfig, model_uri: str | None, variant: str | None) -> ModelSource:
    """The project's variant directory `models/<variant>`, else the MLflow model `model_uri`
    (default: the task's champion)."""
    if variant is not None:
        variant_dir = dvc_layout().model_dir(variant)
        if not (variant_dir / "config.json").is_file():
            raise FileNotFoundError(f"{variant_dir}: no such variant (run the pipeline first)")
        return ModelSource(
            variant,
            partial(
                VariantModel().load,
                variant_dir,
                max_length=cfg.model.max_length,
                temperature=evaluated_temperature(variant),
            ),
        )
    tracking = tracking_uri(cfg.tracking)
    uri = pinned_version(model_uri or champion_uri(cfg.task.type), tracking)
    return ModelSource(uri, partial(load_registered, uri, tracking))


def evaluated_temperature(variant: str) -> float:
    """The temperature this project's last evaluate fitted for `variant` (reports/metrics.json),
    1.0 (logits as they are) when there is none."""
    metrics_file = dvc_layout().metrics_file
    if not metrics_file.is_file():
        return 1.0
    temperature = served_temperature(read_json(metrics_file), variant)
    log.info(
        "%s: scores at temperature %.3f (fitted by evaluate: %s)",
        variant,
        temperature,
        metrics_file,
    )
    return temperature


def pinned_version(model_uri: str, tracking: str) -> str:
    """`models:/NAME@ALIAS` as `models:/NAME/VERSION`, the version the alias points at now (so
    that the version loaded is the version logged, even if the alias moves); other URIs as
    they are."""
    name, has_alias, alias = model_uri.removeprefix(MODELS_SCHEME).partition("@")
    if not model_uri.startswith(MODELS_SCHEME) or not has_alias:
        return model_uri
    try:
        version = MlflowClient(tracking).get_model_version_by_alias(name, alias).version
    except MlflowException as error:
        raise ModelLoadError(f"{model_uri}: {error.message}") from None
    return f"{MODELS_SCHEME}{name}/{version}"


def load_registered(model_uri: str, tracking: str) -> VariantModel:
    """The `VariantModel` of a logged or registered trimflow model."""
    mlflow.set_tracking_uri(tracking)
    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    if not isinstance(model, VariantModel):
        raise ModelLoadError(f"{model_uri} is a {type(model).__name__}, not a trimflow model")
    return model
