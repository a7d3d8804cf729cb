"""Explanations: word attributions of a classifier's answers (Captum), and their agreement."""

# How a text can be explained (explain/attribution.py); here, so that the CLI's parser names
# them without importing captum.
METHODS = ("auto", "ig", "ablation")
