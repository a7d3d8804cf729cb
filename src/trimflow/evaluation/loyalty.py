"""What a variant forgot: its loyalty to the baseline model (Xu et al. 2021, "Beyond preserved
accuracy") and the test examples whose prediction changed (Hooker et al. 2019's forgotten
examples).

Label loyalty is the share of equal predictions; probability loyalty the mean over examples of
1 - sqrt(JS(p_baseline, p_variant)), the Jensen-Shannon divergence in bits (so both lie in
[0, 1], 1 meaning the same). The flip set holds the examples predicted differently; the forgotten
ones were right with the baseline and are wrong now.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from trimflow.evaluation.entities import SeqevalMode, TagSequences, entity_spans

EXCERPT_CHARS = 160
LISTED_EXAMPLES = 20


def probability_loyalty(baseline: np.ndarray, variant: np.ndarray) -> float:
    """Mean 1 - sqrt(JS divergence in bits) between the rows of two probability matrices."""
    p, q = (np.clip(np.asarray(m, dtype=np.float64), 1e-12, None) for m in (baseline, variant))
    middle = (p + q) / 2
    divergence = 0.5 * (p * np.log2(p / middle)).sum(-1) + 0.5 * (q * np.log2(q / middle)).sum(-1)
    return float((1 - np.sqrt(np.clip(divergence, 0.0, 1.0))).mean())


def excerpt(text: str, chars: int = EXCERPT_CHARS) -> str:
    """The start of `text`, cut at a word boundary with an ellipsis when longer than `chars`."""
    if len(text) <= chars:
        return text
    return text[:chars].rsplit(" ", 1)[0] + " …"


def label_flips(
    truth: Sequence[int],
    baseline: Sequence[int],
    variant: Sequence[int],
    labels: list[str],
    texts: Sequence[str],
) -> dict[str, Any]:
    """Classification: the flip set's size and the accuracy of both models on it, the forgotten
    and newly learned examples, and up to LISTED_EXAMPLES forgotten examples (row, excerpt,
    truth, both predictions)."""
    truth, baseline, variant = (np.asarray(a) for a in (truth, baseline, variant))
    flipped = baseline != variant
    forgotten = (baseline == truth) & (variant != truth)
    learned = (baseline != truth) & (variant == truth)
    return {
        "flips": int(flipped.sum()),
        "flip_rate": float(flipped.mean()),
        "flip_accuracy": float((variant[flipped] == truth[flipped]).mean())
        if flipped.any()
        else None,
        "baseline_flip_accuracy": float((baseline[flipped] == truth[flipped]).mean())
        if flipped.any()
        else None,
        "forgotten": int(forgotten.sum()),
        "learned": int(learned.sum()),
        "forgotten_examples": [
            {
                "row": int(row),
                "text": excerpt(texts[row]),
                "truth": labels[truth[row]],
                "baseline": labels[baseline[row]],
                "variant": labels[variant[row]],
            }
            for row in np.flatnonzero(forgotten)[:LISTED_EXAMPLES]
        ],
    }


def entity_flips(
    gold: TagSequences,
    baseline: TagSequences,
    variant: TagSequences,
    mode: SeqevalMode,
    words: Sequence[Sequence[str]],
) -> dict[str, Any]:
    """NER: entities (type and word span) found by one model and not the other, the gold
    entities the baseline found and the variant misses (forgotten) or the reverse (learned),
    and up to LISTED_EXAMPLES forgotten entities (sentence, words, type, what the variant
    tagged there)."""
    flips = forgotten = learned = total = 0
    examples = []
    for row, (gold_tags, base_tags, variant_tags) in enumerate(
        zip(gold, baseline, variant, strict=True)
    ):
        truth = entity_spans(list(gold_tags), mode)
        before = entity_spans(list(base_tags), mode)
        after = entity_spans(list(variant_tags), mode)
        found_before = {span for span, kind in before.items() if truth.get(span) == kind}
        found_after = {span for span, kind in after.items() if truth.get(span) == kind}
        total += len(before.items() | after.items())
        flips += len(before.items() ^ after.items())
        learned += len(found_after - found_before)
        for start, end in sorted(found_before - found_after):
            forgotten += 1
            if len(examples) < LISTED_EXAMPLES:
                examples.append(
                    {
                        "row": row,
                        "text": " ".join(words[row][start:end]),
                        "truth": truth[(start, end)],
                        "variant": " ".join(variant_tags[start:end]),
                    }
                )
    return {
        "entity_flips": flips,
        "flip_rate": flips / total if total else 0.0,
        "forgotten": forgotten,
        "learned": learned,
        "forgotten_examples": examples,
    }


def score_change(variant: dict[str, dict], baseline: dict[str, dict], key: str) -> dict:
    """Per class or entity type (`per_class` / `per_type` of the scores): the variant's `key`
    score minus the baseline's (recall per class, F1 per entity type)."""
    return {
        name: variant[name][key] - scores[key]
        for name, scores in baseline.items()
        if name in variant
    }
