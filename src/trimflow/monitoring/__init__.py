"""Drift monitoring: the prediction log format, the reference profile, `trimflow monitor`."""
