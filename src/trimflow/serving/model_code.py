"""MLflow "model from code" entry point: the file MLflow runs to rebuild a logged variant model.

`log_variant_model` logs this file instead of a pickled object; do not import it elsewhere.
"""

from __future__ import annotations

from mlflow.models import set_model

from trimflow.serving.pyfunc import VariantModel

set_model(VariantModel())
