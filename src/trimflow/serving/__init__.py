"""Serving: any variant as an MLflow pyfunc, its `champion` alias, and `trimflow serve`."""
