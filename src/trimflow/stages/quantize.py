"""quantize: one quantized variant per `quantize.variants` entry (torch, ONNX Runtime or
OpenVINO)."""

from __future__ import annotations

import itertools
import logging

from trimflow.compress.quantize import quantize_model, save_quantized
from trimflow.compress.variants import EXPORTED_VARIANT_BUILDERS, load_variant
from trimflow.config.schema import TrimflowConfig
from trimflow.config.schemes import QUANTIZE_SCHEMES
from trimflow.evaluation.inference import model_inputs
from trimflow.evaluation.inputs import inference_data
from trimflow.layout import Layout, read_label_map
from trimflow.stages import selected_variants
from trimflow.tracking.runs import Tracker
from trimflow.utils.atomic import atomic_dir

log = logging.getLogger(__name__)


def run(cfg: TrimflowConfig, layout: Layout, variant: str | None = None) -> None:
    """For each selected `quantize.variants` entry: load its source variant, quantize it with its
    scheme (torch, or an ONNX export for ONNX Runtime or OpenVINO calibrated on validation
    batches), save models/<variant>."""
    for name in selected_variants(cfg.quantize.variants, variant, "quantize.variants"):
        _quantize_variant(cfg, layout, name)


def _quantize_variant(cfg: TrimflowConfig, layout: Layout, name: str) -> None:
    """Quantize the variant's source model with its scheme and save it under models/<name>."""
    spec = cfg.quantize.variants[name]
    source = layout.model_dir(spec.source)
    digest = read_label_map(source)["dataset_digest"]
    with Tracker(cfg).stage_run("quantize", digest, builds=name):
        model = load_variant(source)
        runtime = QUANTIZE_SCHEMES[spec.scheme].runtime
        if runtime == "torch":
            quantized = quantize_model(model, spec.scheme)
            save_quantized(quantized, source, layout.model_dir(name), spec.scheme)
        else:
            calibration = _calibration_batches(cfg, layout)
            save = EXPORTED_VARIANT_BUILDERS[runtime]
            with atomic_dir(layout.model_dir(name)) as out:
                save(model, source, out, spec.scheme, calibration[0], calibration)
    log.info("quantized %s with %s -> %s", spec.source, spec.scheme, name)


def _calibration_batches(cfg: TrimflowConfig, layout: Layout) -> list[dict]:
    """The first `quantize.calibration_batches` validation batches, without labels (the first
    is also the sample the export traces)."""
    data = inference_data(layout, cfg.finetune.eval_batch_size)
    batches = itertools.islice(data.val_dataloader(), cfg.quantize.calibration_batches)
    return [model_inputs(batch) for batch in batches]
