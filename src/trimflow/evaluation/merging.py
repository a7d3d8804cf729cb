"""Does a merged adapter compute what the adapter on its base model computes?"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from trimflow.data.token_labels import IGNORE_INDEX
from trimflow.evaluation.inference import input_device, model_inputs

MERGE_FIELDS = ("merge_max_abs_diff", "merge_agreement")


def merge_agreement(
    merged: nn.Module, unmerged: nn.Module, batches: Iterable[dict[str, Tensor]]
) -> dict[str, float]:
    """The largest absolute logit difference between the two models over `batches`, and the
    share of predictions they agree on (per text, or per scored token for NER)."""
    largest, same, count = 0.0, 0, 0
    device = input_device(merged)
    with torch.inference_mode():
        for batch in batches:
            inputs = model_inputs(batch, device)
            left, right = merged(**inputs).logits, unmerged(**inputs).logits
            if left.dim() == 3:  # per token: real, labelled tokens only
                keep = (batch["labels"] != IGNORE_INDEX).to(device)
                left, right = left[keep], right[keep]
            largest = max(largest, float((left - right).abs().max()) if left.numel() else 0.0)
            same += int((left.argmax(-1) == right.argmax(-1)).sum())
            count += left.shape[0]
    return dict(zip(MERGE_FIELDS, (largest, same / count if count else 1.0), strict=True))
