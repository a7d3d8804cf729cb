"""What compression changes besides the test score, per variant, on the inputs every variant sees:
calibration (with temperature scaling fitted on the validation split), accuracy under seeded
perturbations, quality per slice, and, against `report.baseline`, loyalty, the flip set and
attribution agreement.

NER gets the same at word level: calibration over the words the model reads (their first
sub-token's probabilities), perturbations of a sample of sentences word by word (entity F1 and
the words whose tag changed), slices of words by gold entity type, sentence length and truncation,
probability loyalty over words and entity flips; explanations are classification's only. The
perturbed texts are a seeded sample of `evaluate.robustness.sample` test texts (NER: sentences)
and the explanations `evaluate.explanations.sample` of them, which bounds their cost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch

from trimflow.config.schema import TrimflowConfig
from trimflow.data.datamodule import TokenizedDataModule
from trimflow.data.sources import extra_columns
from trimflow.data.token_labels import first_pieces, tokenize_words
from trimflow.data.truncation import truncate_texts
from trimflow.evaluation.calibration import calibrate, calibration_scores, softmax
from trimflow.evaluation.entities import SeqevalMode, entity_f1
from trimflow.evaluation.inference import predict_logits, token_logits_in_rows
from trimflow.evaluation.inputs import length_sorted_batches
from trimflow.evaluation.loyalty import (
    entity_flips,
    label_flips,
    probability_loyalty,
    score_change,
)
from trimflow.evaluation.perturbations import (
    invariance_failure_rate,
    perturb_sentences,
    perturb_texts,
    perturbed_accuracy,
    sample_indices,
)
from trimflow.evaluation.scoring import EntityScorer, LabelScorer, agreement, word_logits
from trimflow.evaluation.slices import (
    gap_change,
    slice_features,
    slice_report,
    word_slice_features,
)
from trimflow.layout import Layout

log = logging.getLogger(__name__)


@dataclass
class SplitBatches:
    """Length-sorted model inputs of some texts, their row order and the gold label ids of their
    units: texts, or for NER (`pieces`: each row's words' first sub-tokens) the words read."""

    batches: list[dict[str, torch.Tensor]]
    order: np.ndarray
    truth: np.ndarray
    pieces: list[dict[int, int]] | None = None

    def logits(self, model) -> np.ndarray:
        """`model`'s logits of every unit, in row order (NER: sentence by sentence)."""
        if self.pieces is None:
            logits = predict_logits(model, self.batches)
            in_rows = np.empty_like(logits)
            in_rows[self.order] = logits
            return in_rows
        return word_logits(token_logits_in_rows(model, self.batches, self.order), self.pieces)


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


class TextRobustness:
    """Classification: accuracy and invariance failures of each perturbation of a seeded sample
    of test texts, against the same texts clean (`sample_accuracy`)."""

    def __init__(
        self, truth: np.ndarray, sample: np.ndarray, perturbed: dict[str, PerturbedSample]
    ):
        self.truth, self.sample, self.perturbed = truth[sample], sample, perturbed

    def figures(self, model, predictions: Sequence) -> dict[str, float]:
        """The figures of `model`, whose `predictions` of the whole test split are given."""
        clean = np.asarray(predictions)[self.sample]
        figures = (
            {"sample_accuracy": perturbed_accuracy(self.truth, clean)} if self.perturbed else {}
        )
        for kind, perturbed in self.perturbed.items():
            predicted = perturbed.predictions(model, clean)
            figures[f"accuracy_{kind}"] = perturbed_accuracy(self.truth, predicted)
            figures[f"invariance_failure_{kind}"] = invariance_failure_rate(clean, predicted)
        return figures


@dataclass
class PerturbedSentences:
    """One perturbation of the NER robustness sample: the clean word each perturbed word comes
    from, the perturbed sentences' scorer (their gold tags and word ids) and model inputs."""

    kept: list[list[int]]
    scorer: EntityScorer
    batches: SplitBatches


class SentenceRobustness:
    """NER: entity F1 of each perturbation of a seeded sample of test sentences against the same
    sentences clean (`sample_f1`), and the share of the words left whose tag changed."""

    def __init__(
        self,
        gold: list[list[str]],
        sample: np.ndarray,
        perturbed: dict[str, PerturbedSentences],
        mode: SeqevalMode,
    ):
        self.gold, self.sample, self.perturbed = [gold[i] for i in sample], sample, perturbed
        self.mode = mode

    def figures(self, model, predictions: Sequence) -> dict[str, float]:
        """The figures of `model`, whose tags of the whole test split are given."""
        clean = [predictions[i] for i in self.sample]
        figures = {"sample_f1": entity_f1(self.gold, clean, self.mode)} if self.perturbed else {}
        for kind, perturbed in self.perturbed.items():
            batches = perturbed.batches
            scores = perturbed.scorer.score(model, batches.batches, batches.order)
            figures[f"f1_{kind}"] = scores["f1"]
            before = [
                tags[j] for tags, kept in zip(clean, perturbed.kept, strict=True) for j in kept
            ]
            after = [tag for tags in scores["predictions"] for tag in tags]
            figures[f"invariance_failure_{kind}"] = invariance_failure_rate(before, after)
        return figures


@dataclass
class BeyondInputs:
    """What the beyond-accuracy figures need, built once for every variant."""

    texts: list  # the test texts (NER: their words), in row order
    truth: np.ndarray  # gold label ids of the scorer's units (texts; NER: the words read)
    validation: SplitBatches
    robustness: TextRobustness | SentenceRobustness
    slice_truth: np.ndarray  # gold labels of the units slices count: texts, or every word
    slices: pd.DataFrame  # slicing columns, one row per slice unit
    explained: list[str]  # test texts explained per variant (classification)


def build_beyond_inputs(
    cfg: TrimflowConfig,
    layout: Layout,
    data: TokenizedDataModule,
    labels: list[str],
    scorer: LabelScorer | EntityScorer,
) -> BeyondInputs:
    """The task's beyond-accuracy inputs, tokenized as the tokenize stage did."""
    if cfg.task.type == "ner":
        return _sentence_inputs(cfg, layout, data, labels, scorer)
    return _text_inputs(cfg, layout, data, labels)


def _batches(cfg: TrimflowConfig, data: TokenizedDataModule, rows: list[dict], truth, pieces=None):
    return SplitBatches(
        *length_sorted_batches(rows, data.collator, cfg.evaluate.batch_size), truth, pieces
    )


def _text_inputs(
    cfg: TrimflowConfig, layout: Layout, data: TokenizedDataModule, labels: list[str]
) -> BeyondInputs:
    """Classification: validation batches, the perturbed sample's batches and the slicing
    columns of the test split."""
    ev = cfg.evaluate
    test = pd.read_parquet(layout.prepared / "test.parquet")
    texts = test["text"].tolist()
    truth = np.asarray(data.splits["test"]["labels"])

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
        return PerturbedSample(changed, _batches(cfg, data, kept, truth[sample][changed]))

    perturbed = {kind: perturbation(kind) for kind in ev.robustness.perturbations}
    extra = _extra_columns(test, ev.slices.columns)
    explained = sample_indices(len(texts), ev.explanations.sample, ev.explanations.seed)
    return BeyondInputs(
        texts=texts,
        truth=truth,
        validation=_batches(cfg, data, validation_rows, np.asarray(validation["labels"])),
        robustness=TextRobustness(truth, sample, perturbed),
        slice_truth=truth,
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


def _sentence_inputs(
    cfg: TrimflowConfig,
    layout: Layout,
    data: TokenizedDataModule,
    labels: list[str],
    scorer: EntityScorer,
) -> BeyondInputs:
    """NER: the validation split's words read, the perturbed sample of test sentences, and word
    slices by gold entity type, sentence length (word pieces before truncation) and truncation."""
    ev = cfg.evaluate
    test = pd.read_parquet(layout.prepared / "test.parquet")
    words = test["tokens"].map(list).tolist()
    validation = data.splits["validation"]
    validation_rows = [validation[i] for i in range(len(validation))]
    validation_pieces = [
        first_pieces(ids)
        for ids in datasets.load_from_disk(str(layout.tokenized_splits))["validation"]["word_ids"]
    ]
    validation_truth = np.array(
        [
            int(row["labels"][position])
            for row, kept in zip(validation_rows, validation_pieces, strict=True)
            for position in kept.values()
        ]
    )
    index = {label: i for i, label in enumerate(labels)}

    def tokenized(sentences: list[list[str]], gold: list[list[str]]) -> tuple[list[dict], list]:
        columns, _ = tokenize_words(
            sentences,
            [[index[tag] for tag in tags] for tags in gold],
            data.tokenizer,
            cfg.model.max_length,
            labels,
            cfg.task.label_all_tokens,
        )
        inputs = [k for k in columns if k in data.tokenizer.model_input_names or k == "labels"]
        rows = [{k: columns[k][i] for k in inputs} for i in range(len(sentences))]
        return rows, columns["word_ids"]

    sample = sample_indices(len(words), ev.robustness.sample, ev.robustness.seed)

    def perturbation(kind: str) -> PerturbedSentences:
        perturbed = perturb_sentences([words[i] for i in sample], kind, ev.robustness.seed)
        gold = [
            [scorer.gold[i][j] for j in kept]
            for i, (_, kept) in zip(sample, perturbed, strict=True)
        ]
        rows, word_ids = tokenized([sentence for sentence, _ in perturbed], gold)
        return PerturbedSentences(
            kept=[kept for _, kept in perturbed],
            scorer=EntityScorer(gold, word_ids, labels, cfg.task.seqeval_mode),
            batches=_batches(cfg, data, rows, None),
        )

    pieces = [len(ids) for ids in data.tokenizer(words, is_split_into_words=True)["input_ids"]]
    return BeyondInputs(
        texts=words,
        truth=scorer.truth,
        validation=_batches(cfg, data, validation_rows, validation_truth, validation_pieces),
        robustness=SentenceRobustness(
            scorer.gold,
            sample,
            {kind: perturbation(kind) for kind in ev.robustness.perturbations},
            cfg.task.seqeval_mode,
        ),
        slice_truth=np.array([tag for tags in scorer.gold for tag in tags]),
        slices=word_slice_features(
            scorer.gold,
            pieces,
            [len(kept) < len(tags) for kept, tags in zip(scorer.pieces, scorer.gold, strict=True)],
            length_edges=ev.slices.length_edges,
        ),
        explained=[],
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
    """Calibration, robustness and slice figures of one model, from its test `scores` (their
    `logits` and `predictions`) and passes over the validation split and the perturbed
    sample."""
    ev = cfg.evaluate
    logits, predictions = scores["logits"], scores["predictions"]
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
    figures.update(inputs.robustness.figures(model, predictions))
    flat = [tag for tags in predictions for tag in tags] if cfg.task.type == "ner" else predictions
    slices = slice_report(inputs.slice_truth, flat, inputs.slices, min_size=ev.slices.min_size)
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
            "label_loyalty": agreement(detail["predictions"], reference["predictions"]),
            "probability_loyalty": probability_loyalty(
                softmax(reference["logits"]), softmax(detail["logits"])
            ),
            "slice_gap_change": gap_change(detail["slices"], reference["slices"]),
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
            figure["score_change"] = score_change(
                detail["per_class"], reference["per_class"], "recall"
            )
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
