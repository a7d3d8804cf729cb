"""Serving: any variant as an MLflow pyfunc, registered with a `champion` alias."""
