"""Seeded, offline text perturbations and the robustness scores computed from them.

Each perturbation maps one text and a `random.Random` to a perturbed text (`PERTURBATIONS`);
`perturb_texts` applies one kind to a list, each text with its own generator seeded from
`"{seed}:{kind}:{index}"`. Python seeds a generator from a string through SHA-512, so the output
depends only on (texts, kind, seed): not on the hash seed of the process, nor on which other
kinds ran before. Nothing is downloaded: the keyboard table below is the only resource. The
config offers the kinds as `config.schema.Perturbation` (a test keeps both the same).
`perturb_sentences` applies the same kinds to pre-split sentences (NER) word by word, keeping
track of which words survive so that their gold tags follow.

Kinds:

- `typo1`, `typo3`: one or three typos, each in a different word. A word here is a run of at
  least 3 ASCII letters (CheckList and TextAttack leave shorter words alone); a typo is one of:
  swap two adjacent, different letters; delete a letter; insert a keyboard neighbour of the
  letter before it; substitute a keyboard neighbour (QWERTY). Whitespace is never touched, so
  the whitespace-separated word count is unchanged. A text with fewer such words than typos
  gets one typo per word it has (none: unchanged). Each insertion, deletion or substitution is
  Levenshtein distance 1 from its word, a swap distance 2 (1 when a transposition counts as
  one edit, the optimal string alignment distance).
- `word_drop`: removes one whitespace-separated word with the whitespace after it (before it
  for the last word); a text of at most one word is unchanged.
- `case`: upper-cases the whole text. Upper rather than lower case because many corpora, R8
  among them, are lower-case already, where lower-casing would test nothing; upper rather
  than title case because it changes every letter, the strongest case shift (CheckList's
  "shouting"). A cased model should answer the same; an uncased one sees the same pieces.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence

import numpy as np

# Keys adjacent to each letter on a QWERTY keyboard (same row and the rows above and below).
KEYBOARD_NEIGHBOURS: dict[str, str] = {
    "q": "wa",
    "w": "qeas",
    "e": "wrsd",
    "r": "etdf",
    "t": "ryfg",
    "y": "tugh",
    "u": "yihj",
    "i": "uojk",
    "o": "ipkl",
    "p": "ol",
    "a": "qwsz",
    "s": "weadzx",
    "d": "erfsxc",
    "f": "rtdgcv",
    "g": "tyfhvb",
    "h": "yugjbn",
    "j": "uihknm",
    "k": "iojlm",
    "l": "opk",
    "z": "asx",
    "x": "zsdc",
    "c": "xdfv",
    "v": "cfgb",
    "b": "vghn",
    "n": "bhjm",
    "m": "njk",
}
# A word a typo may go into: a run of at least this many ASCII letters.
MIN_TYPO_WORD_LETTERS = 3
_TYPO_WORD = re.compile(rf"[A-Za-z]{{{MIN_TYPO_WORD_LETTERS},}}")
_WHITESPACE_WORD = re.compile(r"\S+")


def _neighbour_key(letter: str, rng: random.Random) -> str:
    """A keyboard neighbour of `letter`, in the same case."""
    neighbour = rng.choice(KEYBOARD_NEIGHBOURS[letter.lower()])
    return neighbour.upper() if letter.isupper() else neighbour


def _swap(word: str, rng: random.Random) -> str:
    """Swaps two adjacent letters that differ (the caller checks that such a pair exists)."""
    positions = [i for i in range(len(word) - 1) if word[i] != word[i + 1]]
    i = rng.choice(positions)
    return word[:i] + word[i + 1] + word[i] + word[i + 2 :]


def _delete(word: str, rng: random.Random) -> str:
    """Deletes one letter."""
    i = rng.randrange(len(word))
    return word[:i] + word[i + 1 :]


def _insert(word: str, rng: random.Random) -> str:
    """Inserts a keyboard neighbour of a letter right after it."""
    i = rng.randrange(len(word))
    return word[: i + 1] + _neighbour_key(word[i], rng) + word[i + 1 :]


def _substitute(word: str, rng: random.Random) -> str:
    """Replaces one letter with a keyboard neighbour."""
    i = rng.randrange(len(word))
    return word[:i] + _neighbour_key(word[i], rng) + word[i + 1 :]


def typo(word: str, rng: random.Random) -> str:
    """One typo in `word` (ASCII letters only), its kind drawn among those that change it."""
    edits = [_delete, _insert, _substitute]
    if any(a != b for a, b in zip(word, word[1:], strict=False)):
        edits.append(_swap)
    return rng.choice(edits)(word, rng)


def add_typos(text: str, count: int, rng: random.Random) -> str:
    """`count` typos in as many different words of `text` (fewer when it has fewer words)."""
    spans = [match.span() for match in _TYPO_WORD.finditer(text)]
    chosen = sorted(rng.sample(spans, min(count, len(spans))), reverse=True)
    for start, end in chosen:
        text = text[:start] + typo(text[start:end], rng) + text[end:]
    return text


def drop_word(text: str, rng: random.Random) -> str:
    """`text` without one of its whitespace-separated words (unchanged when it has at most one)."""
    spans = [match.span() for match in _WHITESPACE_WORD.finditer(text)]
    if len(spans) < 2:
        return text
    index = rng.randrange(len(spans))
    start, end = spans[index]
    if index + 1 < len(spans):
        end = spans[index + 1][0]
    else:
        start = spans[index - 1][1]
    return text[:start] + text[end:]


def upper_case(text: str, rng: random.Random) -> str:
    """`text` in upper case (`rng` unused: the registry's signature)."""
    return text.upper()


PERTURBATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "typo1": lambda text, rng: add_typos(text, 1, rng),
    "typo3": lambda text, rng: add_typos(text, 3, rng),
    "word_drop": drop_word,
    "case": upper_case,
}


# Pre-split sentences (NER): the words after the perturbation and the index of the word each
# comes from, so that gold tags follow. Typos go into whole words of 3+ ASCII letters only.
Sentence = tuple[list[str], list[int]]


def _typo_words(words: Sequence[str], count: int, rng: random.Random) -> Sentence:
    """`count` typos, each in a different word (fewer when fewer words can take one)."""
    candidates = [i for i, word in enumerate(words) if _TYPO_WORD.fullmatch(word)]
    perturbed = list(words)
    for i in sorted(rng.sample(candidates, min(count, len(candidates)))):
        perturbed[i] = typo(words[i], rng)
    return perturbed, list(range(len(words)))


def _drop_one_word(words: Sequence[str], rng: random.Random) -> Sentence:
    """The sentence without one of its words (unchanged when it has at most one)."""
    kept = list(range(len(words)))
    if len(words) >= 2:
        del kept[rng.randrange(len(words))]
    return [words[i] for i in kept], kept


SENTENCE_PERTURBATIONS: dict[str, Callable[[Sequence[str], random.Random], Sentence]] = {
    "typo1": lambda words, rng: _typo_words(words, 1, rng),
    "typo3": lambda words, rng: _typo_words(words, 3, rng),
    "word_drop": _drop_one_word,
    "case": lambda words, rng: ([word.upper() for word in words], list(range(len(words)))),
}


def _seeded(items: Sequence, kind: str, seed: int, registry: dict[str, Callable]) -> list:
    """Each item perturbed by `registry[kind]`, with a generator seeded from (seed, kind, its
    index)."""
    if kind not in registry:
        raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(registry)}")
    perturb = registry[kind]
    return [
        perturb(item, random.Random(f"{seed}:{kind}:{index}")) for index, item in enumerate(items)
    ]


def perturb_texts(texts: Sequence[str], kind: str, seed: int) -> list[str]:
    """Each text perturbed by `kind`, with a generator seeded from (seed, kind, its index)."""
    return _seeded(texts, kind, seed, PERTURBATIONS)


def perturb_sentences(sentences: Sequence[Sequence[str]], kind: str, seed: int) -> list[Sentence]:
    """Each pre-split sentence perturbed by `kind` word by word (the same kinds as
    `perturb_texts`), with the index of the word each perturbed word comes from."""
    return _seeded(sentences, kind, seed, SENTENCE_PERTURBATIONS)


def _share_equal(first: Sequence[int], second: Sequence[int]) -> float:
    """Share of positions where two equally long, non-empty label sequences agree."""
    if len(first) != len(second) or len(first) == 0:
        raise ValueError(f"need two equally long, non-empty sequences: {len(first)}, {len(second)}")
    return float(np.mean(np.asarray(first) == np.asarray(second)))


def invariance_failure_rate(
    clean_predictions: Sequence[int], perturbed_predictions: Sequence[int]
) -> float:
    """Share of predictions the perturbation changes (CheckList's invariance test)."""
    return 1.0 - _share_equal(clean_predictions, perturbed_predictions)


def perturbed_accuracy(truth: Sequence[int], predictions: Sequence[int]) -> float:
    """Accuracy of `predictions` (of perturbed texts, or of the same texts clean)."""
    return _share_equal(truth, predictions)


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    """A sorted, seeded sample of `size` row indices out of `n` (all rows when size >= n)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
