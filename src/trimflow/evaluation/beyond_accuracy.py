"""What compression changes besides the test score, per variant, on the inputs every variant sees:
calibration (with temperature scaling fitted on the validation split), accuracy under seeded
perturbations, quality per slice, and, against `report.baseline`, loyalty, the flip set and
attribution agreement.

Classification gets every figure; NER gets loyalty (entity flips, per-type F1 change). The
perturbed texts are a seeded sample of `evaluate.robustness.sample` test texts and the
explanations `evaluate.explanations.sample` of them, which bounds their cost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from trimflow.config.schema import TrimflowConfig
from trimflow.data.datamodule import TokenizedDataModule
from trimflow.data.sources import extra_columns
from trimflow.data.truncation import truncate_texts
from trimflow.evaluation.calibration import calibrate, calibration_scores, softmax
from trimflow.evaluation.inference import predict_logits
from trimflow.evaluation.inputs import length_sorted_batches
from trimflow.evaluation.loyalty import (
    entity_flips,
    label_flips,
    probability_loyalty,
    score_change,
)
from trimflow.evaluation.perturbations import (
    invariance_failure_rate,
    perturb_texts,
    perturbed_accuracy,
    sample_indices,
)
from trimflow.evaluation.scoring import agreement
from trimflow.evaluation.slices import gap_change, slice_features, slice_report
from trimflow.layout import Layout

log = logging.getLogger(__name__)


@dataclass
class SplitBatches:
    """Length-sorted model inputs of some texts, their row order and gold labels."""

    batches: list[dict[str, torch.Tensor]]
    order: np.ndarray
    truth: np.ndarray

    def logits(self, model) -> np.ndarray:
        """`model`'s logits of every text, in row order."""
        logits = predict_logits(model, self.batches)
        in_rows = np.empty_like(logits)
        in_rows[self.order] = logits
        return in_rows


@dataclass
class PerturbedSample:
    """One perturbation of the robustness sample: the positions in the sample whose model input
    it changed, and their inputs (an unchanged input is predicted as it was: no pass needed,
    e.g. a case change under an uncased tokenizer, or a typo in a part truncation cuts)."""

    changed: np.ndarray
    batches: SplitBatches | None

    def predictions(self, model, clean: np.ndarray) -> np.ndarray:
        """`model`'s labels of the perturbed sample, given its `clean` labels of the sample."""
        predicted = clean.copy()
        if self.batches is not None:
            predicted[self.changed] = self.batches.logits(model).argmax(axis=-1)
        return predicted


@dataclass
class BeyondInputs:
    """What the beyond-accuracy figures need, built once for every variant (classification)."""

    texts: list[str]  # the test texts, in row order
    truth: np.ndarray  # gold label ids of the test split
    validation: SplitBatches
    sample: np.ndarray  # test rows that are perturbed
    perturbed: dict[str, PerturbedSample]  # perturbation kind -> the perturbed sample
    slices: pd.DataFrame  # slicing columns, one row per test text
    explained: list[str]  # test texts explained per variant


def build_beyond_inputs(
    cfg: TrimflowConfig, layout: Layout, data: TokenizedDataModule, labels: list[str]
) -> BeyondInputs:
    """Validation batches, the perturbed sample's batches and the slicing columns of the test
    split, tokenized as the tokenize stage did."""
    ev = cfg.evaluate
    test = pd.read_parquet(layout.prepared / "test.parquet")
    texts = test["text"].tolist()
    truth = np.asarray(data.splits["test"]["labels"])

    def batches(rows: list[dict], gold: np.ndarray) -> SplitBatches:
        return SplitBatches(*length_sorted_batches(rows, data.collator, ev.batch_size), gold)

    def tokenized(chosen: list[str]):
        return truncate_texts(data.tokenizer, chosen, cfg.model.max_length, cfg.model.truncation)

    def rows_of(encoded) -> list[dict]:
        columns = encoded.inputs
        return [{key: columns[key][i] for key in columns} for i in range(len(columns["input_ids"]))]

    validation = data.splits["validation"]
    validation_rows = [validation[i] for i in range(len(validation))]
    sample = sample_indices(len(texts), ev.robustness.sample, ev.robustness.seed)
    sampled = [texts[i] for i in sample]
    whole = tokenized(texts)
    whole_rows = rows_of(whole)
    clean_rows = [whole_rows[i] for i in sample]

    def perturbation(kind: str) -> PerturbedSample:
        rows = rows_of(tokenized(perturb_texts(sampled, kind, ev.robustness.seed)))
        changed = np.flatnonzero(
            [
                row["input_ids"] != clean["input_ids"]
                for row, clean in zip(rows, clean_rows, strict=True)
            ]
        )
        log.info(
            "robustness: %s changes the model input of %d of %d sampled test texts",
            kind,
            len(changed),
            len(sampled),
        )
        if not len(changed):
            return PerturbedSample(changed, None)
        kept = [rows[i] for i in changed]
        return PerturbedSample(changed, batches(kept, truth[sample][changed]))

    perturbed = {kind: perturbation(kind) for kind in ev.robustness.perturbations}
    extra = _extra_columns(test, ev.slices.columns)
    explained = sample_indices(len(texts), ev.explanations.sample, ev.explanations.seed)
    return BeyondInputs(
        texts=texts,
        truth=truth,
        validation=batches(validation_rows, np.asarray(validation["labels"])),
        sample=sample,
        perturbed=perturbed,
        slices=slice_features(
            truth,
            labels,
            [len(encoding.ids) for encoding in whole.encodings],
            whole.truncated,
            extra,
            length_edges=ev.slices.length_edges,
        ),
        explained=[texts[i] for i in explained] if ev.explanations.sample else [],
    )


def _extra_columns(test: pd.DataFrame, columns: list[str] | None) -> pd.DataFrame | None:
    """The prepared test split's extra columns to slice by (`evaluate.slices.columns`; None:
    all of them); a named column the dataset lacks is a ValueError naming the key."""
    available = extra_columns(test)
    chosen = available if columns is None else columns
    missing = [c for c in chosen if c not in available]
    if missing:
        raise ValueError(
            f"evaluate.slices.columns: {', '.join(missing)} not in the dataset's extra columns "
            f"({', '.join(available) or 'none'})"
        )
    return test[chosen].astype(str) if chosen else None


def variant_figures(
    cfg: TrimflowConfig, model, scores: dict[str, Any], inputs: BeyondInputs
) -> dict[str, Any]:
    """Calibration, robustness and slice figures of one classifier, from its test `scores`
    (their `logits` and `predictions`) and passes over the validation split and the perturbed
    sample."""
    ev = cfg.evaluate
    logits, predictions = scores["logits"], np.asarray(scores["predictions"])
    if ev.calibration.temperature_scaling:
        figures = calibrate(
            logits,
            inputs.truth,
            inputs.validation.logits(model),
            inputs.validation.truth,
            ev.calibration.bins,
        )
    else:
        figures = calibration_scores(logits, inputs.truth, ev.calibration.bins)
    clean, sample_truth = predictions[inputs.sample], inputs.truth[inputs.sample]
    if inputs.perturbed:
        figures["sample_accuracy"] = perturbed_accuracy(sample_truth, clean)
    for kind, perturbed in inputs.perturbed.items():
        predicted = perturbed.predictions(model, clean)
        figures[f"accuracy_{kind}"] = perturbed_accuracy(sample_truth, predicted)
        figures[f"invariance_failure_{kind}"] = invariance_failure_rate(clean, predicted)
    slices = slice_report(inputs.truth, predictions, inputs.slices, min_size=ev.slices.min_size)
    figures.update(
        slices=slices,
        worst_slice=slices["worst_slice"],
        worst_slice_accuracy=slices["worst_slice_accuracy"],
        slice_gap=slices["slice_gap"],
    )
    return figures


def against_baseline(
    cfg: TrimflowConfig, details: dict[str, dict], baseline: str, truth: list, texts: list
) -> dict[str, dict[str, Any]]:
    """Per variant: label and probability loyalty to `baseline`, its flip set and forgotten
    examples, per-class recall (NER: per-type F1) change, and its slice gap's change.

    `truth` and `texts`: the test split's label ids and texts, or for NER its gold tags and
    words."""
    reference = details[baseline]
    figures = {}
    for name, detail in details.items():
        figure: dict[str, Any] = {
            "label_loyalty": agreement(detail["predictions"], reference["predictions"])
        }
        if cfg.task.type == "ner":
            flips = entity_flips(
                truth, reference["predictions"], detail["predictions"], cfg.task.seqeval_mode, texts
            )
            figure["score_change"] = score_change(detail["per_type"], reference["per_type"], "f1")
        else:
            flips = label_flips(
                truth,
                reference["predictions"],
                detail["predictions"],
                detail["label_names"],
                texts,
            )
            figure["probability_loyalty"] = probability_loyalty(
                softmax(reference["logits"]), softmax(detail["logits"])
            )
            figure["score_change"] = score_change(
                detail["per_class"], reference["per_class"], "recall"
            )
            figure["slice_gap_change"] = gap_change(detail["slices"], reference["slices"])
        figure.update(flips=flips, flip_rate=flips["flip_rate"], forgotten=flips["forgotten"])
        figure["flip_accuracy"] = flips.get("flip_accuracy")
        figures[name] = figure
    return figures


def attribution_figures(
    served: dict[str, Any], baseline: str, texts: list[str], top_k: int
) -> dict[str, dict[str, float]]:
    """Per variant (loaded as the service loads it, `served`): word attributions of `texts` by
    feature ablation, their agreement with `baseline`'s, and the milliseconds per text."""
    from trimflow.explain.agreement import attribution_agreement
    from trimflow.explain.attribution import ablation_word_attributions

    attributions, costs = {}, {}
    for name, model in served.items():
        start = time.perf_counter()
        attributions[name] = ablation_word_attributions(model, texts)
        costs[name] = 1000 * (time.perf_counter() - start) / len(texts)
    return {
        name: {
            **attribution_agreement(attributions[baseline], values, top_k),
            "explain_ms": costs[name],
        }
        for name, values in attributions.items()
    }
