"""What `trimflow serve` and `trimflow predict` load: a variant directory of this project, or a
logged or registered trimflow model (by default the task's champion)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import mlflow

from trimflow.config.schema import TrimflowConfig
from trimflow.layout import dvc_layout
from trimflow.serving.pyfunc import VariantModel
from trimflow.serving.registry import champion_uri
from trimflow.tracking.runs import tracking_uri


class ModelLoadError(RuntimeError):
    """The model could not be loaded."""


def model_source(cfg: TrimflowConfig, model_uri: str | None, variant: str | None) -> str:
    """What `model_loader` loads, in words for the log."""
    return variant or model_uri or champion_uri(cfg.task.type)


def model_loader(
    cfg: TrimflowConfig, model_uri: str | None, variant: str | None
) -> Callable[[], VariantModel]:
    """How to load the model: the project's variant directory `models/<variant>`, else the
    MLflow model `model_uri` (default: the task's champion)."""
    if variant is not None:
        variant_dir = dvc_layout().model_dir(variant)
        if not (variant_dir / "config.json").is_file():
            raise FileNotFoundError(f"{variant_dir}: no such variant (run the pipeline first)")
        return partial(VariantModel().load, variant_dir, max_length=cfg.model.max_length)
    return partial(
        load_registered, model_uri or champion_uri(cfg.task.type), tracking_uri(cfg.tracking)
    )


def load_registered(model_uri: str, tracking: str) -> VariantModel:
    """The `VariantModel` of a logged or registered trimflow model."""
    mlflow.set_tracking_uri(tracking)
    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    if not isinstance(model, VariantModel):
        raise ModelLoadError(f"{model_uri} is a {type(model).__name__}, not a trimflow model")
    return model
