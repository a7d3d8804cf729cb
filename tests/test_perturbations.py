"""Seeded text perturbations: reproducibility, the edit each kind makes, robustness scores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import get_args

import numpy as np
import pytest

from trimflow.config.schema import Perturbation
from trimflow.evaluation.perturbations import (
    KEYBOARD_NEIGHBOURS,
    PERTURBATIONS,
    SENTENCE_PERTURBATIONS,
    invariance_failure_rate,
    perturb_sentences,
    perturb_texts,
    perturbed_accuracy,
    sample_indices,
)

# R8-like texts: lower case, long enough for three typos.
TEXTS = [
    "shares of the company rose sharply after the quarterly earnings report",
    "oil prices fell  as opec agreed to raise output\tnext month",
    "the bank said it will acquire the smaller lender for cash",
    "grain exports to the soviet union climbed in march",
] * 5
SEEDS = range(40)


def osa_distance(a: str, b: str) -> int:
    """Edit distance counting insertions, deletions, substitutions and adjacent swaps as one."""
    rows = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            rows[i][j] = min(
                rows[i - 1][j] + 1, rows[i][j - 1] + 1, rows[i - 1][j - 1] + (a[i - 1] != b[j - 1])
            )
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                rows[i][j] = min(rows[i][j], rows[i - 2][j - 2] + 1)
    return rows[len(a)][len(b)]


def changed_words(text: str, perturbed: str) -> list[tuple[str, str]]:
    """The (original, perturbed) whitespace-separated words that differ, checking word count."""
    words, perturbed_words = text.split(), perturbed.split()
    assert len(words) == len(perturbed_words)
    return [(a, b) for a, b in zip(words, perturbed_words, strict=True) if a != b]


def test_same_seed_same_output_and_different_seeds_differ():
    for kind in PERTURBATIONS:
        assert perturb_texts(TEXTS, kind, 7) == perturb_texts(TEXTS, kind, 7)
    for kind in ("typo1", "typo3", "word_drop"):
        assert perturb_texts(TEXTS, kind, 7) != perturb_texts(TEXTS, kind, 8)


def test_output_independent_of_hash_seed():
    code = (
        "import json, sys; from trimflow.evaluation.perturbations import PERTURBATIONS, "
        "perturb_texts; texts = json.load(sys.stdin); "
        "print(json.dumps({k: perturb_texts(texts, k, 3) for k in PERTURBATIONS}))"
    )
    expected = {kind: perturb_texts(TEXTS, kind, 3) for kind in PERTURBATIONS}
    for hash_seed in ("0", "12345"):
        result = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(TEXTS),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        )
        assert json.loads(result.stdout) == expected


def test_each_text_perturbed_by_its_own_index():
    """A text's output depends on its index, not on the texts around it."""
    assert perturb_texts(TEXTS[:2], "typo3", 5) == perturb_texts(TEXTS, "typo3", 5)[:2]


def test_typo1_changes_one_word_by_one_edit_and_keeps_whitespace():
    """One insertion, deletion or substitution (Levenshtein 1) or adjacent swap (Levenshtein 2):
    optimal string alignment distance 1."""
    for seed in SEEDS:
        for text, perturbed in zip(TEXTS, perturb_texts(TEXTS, "typo1", seed), strict=True):
            assert re.findall(r"\s+", perturbed) == re.findall(r"\s+", text)
            [(word, typo)] = changed_words(text, perturbed)
            assert len(word) >= 3
            assert osa_distance(word, typo) == 1
            assert osa_distance(text, perturbed) == 1


def test_typo3_changes_three_words_by_one_edit_each():
    for seed in SEEDS:
        for text, perturbed in zip(TEXTS, perturb_texts(TEXTS, "typo3", seed), strict=True):
            assert re.findall(r"\s+", perturbed) == re.findall(r"\s+", text)
            changes = changed_words(text, perturbed)
            assert len(changes) == 3
            assert all(osa_distance(word, typo) == 1 for word, typo in changes)


def test_typos_keep_the_case_of_letters():
    for perturbed in perturb_texts(["SHARES ROSE SHARPLY TODAY"] * 40, "typo3", 1):
        assert perturbed.isupper()


def test_texts_without_a_long_word_get_no_typo_and_few_words_fewer_typos():
    short = ["", "  ", "a to be", "it is 1987 - ok", "é à ü"]
    for kind in ("typo1", "typo3"):
        assert perturb_texts(short, kind, 0) == short
    for seed in SEEDS:
        [perturbed] = perturb_texts(["an oil deal is up"], "typo3", seed)
        assert len(changed_words("an oil deal is up", perturbed)) == 2


def test_word_drop_removes_exactly_one_word():
    for seed in SEEDS:
        for text, perturbed in zip(TEXTS, perturb_texts(TEXTS, "word_drop", seed), strict=True):
            words, kept = text.split(), perturbed.split()
            assert len(kept) == len(words) - 1
            assert any(words[:i] + words[i + 1 :] == kept for i in range(len(words)))
            assert perturbed == perturbed.strip()


def test_word_drop_leaves_texts_of_one_word_unchanged():
    texts = ["", "earnings", "  earnings\n"]
    assert perturb_texts(texts, "word_drop", 0) == texts


def test_case_upper_cases_the_text():
    perturbed = perturb_texts(TEXTS, "case", 0)
    assert perturbed == [text.upper() for text in TEXTS]
    assert all(a != b for a, b in zip(TEXTS, perturbed, strict=True))


def test_unknown_kind_names_the_known_ones():
    with pytest.raises(ValueError, match="typo1, typo3, word_drop, case"):
        perturb_texts(TEXTS, "synonym", 0)


def test_keyboard_neighbours_are_mutual():
    assert sorted(KEYBOARD_NEIGHBOURS) == list("abcdefghijklmnopqrstuvwxyz")
    for key, neighbours in KEYBOARD_NEIGHBOURS.items():
        assert all(key in KEYBOARD_NEIGHBOURS[neighbour] for neighbour in neighbours)


def test_invariance_failure_rate_and_perturbed_accuracy():
    assert invariance_failure_rate([0, 1, 1, 0], [0, 1, 0, 0]) == 0.25
    assert invariance_failure_rate([2, 2], [2, 2]) == 0.0
    assert perturbed_accuracy(np.array([0, 1, 1, 0]), np.array([0, 0, 0, 0])) == 0.5
    for first, second in (([0, 1], [0]), ([], [])):
        with pytest.raises(ValueError, match="equally long, non-empty"):
            invariance_failure_rate(first, second)


def test_sample_indices_sorted_seeded_and_all_rows_when_size_covers_them():
    sample = sample_indices(100, 10, seed=4)
    assert len(sample) == 10 and len(set(sample.tolist())) == 10
    assert np.all(np.diff(sample) > 0) and sample.min() >= 0 and sample.max() < 100
    assert np.array_equal(sample, sample_indices(100, 10, seed=4))
    assert not np.array_equal(sample, sample_indices(100, 10, seed=5))
    assert np.array_equal(sample_indices(5, 5, seed=0), np.arange(5))
    assert np.array_equal(sample_indices(5, 50, seed=0), np.arange(5))


def test_the_config_offers_exactly_the_registered_perturbations():
    assert set(get_args(Perturbation)) == set(PERTURBATIONS)


SENTENCES = [["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."]] * 10


def test_sentence_typos_change_that_many_long_words_by_one_edit_and_keep_every_word():
    for count, kind in ((1, "typo1"), (3, "typo3")):
        for words, (perturbed, kept) in zip(
            SENTENCES, perturb_sentences(SENTENCES, kind, 0), strict=True
        ):
            assert kept == list(range(len(words)))
            changed = [(a, b) for a, b in zip(words, perturbed, strict=True) if a != b]
            assert len(changed) == count
            assert all(len(a) >= 3 and a.isalpha() and osa_distance(a, b) == 1 for a, b in changed)


def test_sentence_word_drop_keeps_the_other_words_with_their_indices():
    dropped = perturb_sentences(SENTENCES, "word_drop", 3)
    for words, (perturbed, kept) in zip(SENTENCES, dropped, strict=True):
        assert len(kept) == len(words) - 1 and perturbed == [words[i] for i in kept]
    assert perturb_sentences([["Paris"]], "word_drop", 0) == [(["Paris"], [0])]


def test_sentence_perturbations_are_seeded_and_case_upper_cases_every_word():
    assert perturb_sentences(SENTENCES, "typo3", 5) == perturb_sentences(SENTENCES, "typo3", 5)
    assert perturb_sentences(SENTENCES, "typo3", 5) != perturb_sentences(SENTENCES, "typo3", 6)
    assert perturb_sentences([["EU", "lamb"]], "case", 0) == [(["EU", "LAMB"], [0, 1])]
    assert SENTENCE_PERTURBATIONS.keys() == PERTURBATIONS.keys()
