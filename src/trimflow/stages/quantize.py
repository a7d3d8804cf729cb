"""quantize: dynamic int8 of the Linear layers of the fine-tuned and pruned models."""

from __future__ import annotations

import logging

from trimflow.compress.quantize import load_variant, quantize_dynamic_int8, save_quantized
from trimflow.config.schema import TrimflowConfig
from trimflow.layout import Layout
from trimflow.models.loading import read_label_map
from trimflow.tracking.runs import Tracker
from trimflow.utils.atomic import atomic_dir

log = logging.getLogger(__name__)


def quantized_variant(source: str) -> str:
    """The variant name of a quantized source model: finetuned -> quantized."""
    return "quantized" if source == "finetuned" else f"{source}_quantized"


def run(cfg: TrimflowConfig, layout: Layout) -> None:
    digest = read_label_map(layout.finetuned)["dataset_digest"]
    with Tracker(cfg).stage_run("quantize", digest), atomic_dir(layout.quantized) as out:
        for source in cfg.quantize.sources:
            model = quantize_dynamic_int8(load_variant(layout.fp32_variants[source]))
            save_quantized(model, layout.fp32_variants[source], out / quantized_variant(source))
            log.info("quantized %s -> %s", source, quantized_variant(source))
