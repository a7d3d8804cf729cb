"""Token-level NER data: CoNLL-style files, IOB2 tag checks and entity-stratified splits.

A file holds one token per line (`token<TAB>tag`, `token tag` or CoNLL-2003 columns with the
tag last); blank or whitespace-only lines end a sentence and `-DOCSTART-` lines are skipped.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from trimflow.data.errors import DataError

DOCSTART = "-DOCSTART-"
IOB2_TAG = re.compile(r"O|[BI]-\S+")
ENTITY_PREFIXES = ("B-", "I-")
REMAINDER_PART = "train"


@dataclass(frozen=True)
class Sentence:
    """Tokens with one tag each, and where they came from for error messages."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]
    source: str  # file path, or "name[split]" for a Hugging Face dataset
    line: int  # 1-based file line of the first token; row index for datasets
    from_dataset: bool = False

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.tags):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.tags)} tags")

    def where(self, index: int = 0) -> str:
        """'path:LINE' of token `index` for files, 'name[split] row R' for datasets."""
        if self.from_dataset:
            return f"{self.source} row {self.line}"
        return f"{self.source}:{self.line + index}"


@dataclass(frozen=True)
class TagCheck:
    """Sentences after the IOB2 check, and how many I- tags were rewritten as B-."""

    sentences: list[Sentence]
    repaired: int


def read_conll(path: str | Path) -> list[Sentence]:
    """Read sentences from a CoNLL-style file; the token is the first column, the tag the last."""
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    first_line = 0
    for number, text in enumerate(_read_lines(Path(path)), start=1):
        columns = _columns(text)
        if not columns or columns[0] == DOCSTART:
            _keep_sentence(sentences, tokens, tags, str(path), first_line)
            tokens, tags = [], []
            continue
        if not tokens:
            first_line = number
        token, tag = _token_and_tag(columns, f"{path}:{number}")
        tokens.append(token)
        tags.append(tag)
    _keep_sentence(sentences, tokens, tags, str(path), first_line)
    return sentences


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8: {err}") from err
    except OSError as err:
        raise DataError(f"{path}: cannot be read: {err}") from err
    return text.split("\n")


def _columns(text: str) -> list[str]:
    """Columns of a line: split on TAB if it has one (tokens may hold spaces), else whitespace."""
    text = text.rstrip()
    if "\t" in text:
        return [column.strip() for column in text.split("\t")]
    return text.split()


def _token_and_tag(columns: list[str], where: str) -> tuple[str, str]:
    token, tag = columns[0], columns[-1]
    if len(columns) < 2:
        raise DataError(
            f"{where}: no tag after token '{token}' "
            "(expected token<TAB>tag, tag in the last column)"
        )
    if not token:
        raise DataError(f"{where}: empty token before tag '{tag}'")
    return token, tag


def _keep_sentence(
    sentences: list[Sentence], tokens: list[str], tags: list[str], source: str, line: int
) -> None:
    if tokens:
        sentences.append(Sentence(tuple(tokens), tuple(tags), source, line))


def write_conll(sentences: Iterable[Sentence], path: str | Path) -> None:
    """Write `token<TAB>tag` lines with a blank line after each sentence."""
    blocks = (
        "".join(f"{token}\t{tag}\n" for token, tag in zip(s.tokens, s.tags, strict=True)) + "\n"
        for s in sentences
    )
    Path(path).write_text("".join(blocks), encoding="utf-8")


def sentences_from_columns(
    tokens: Sequence[Sequence[str]], tags: Sequence[Sequence[str]], source: str
) -> list[Sentence]:
    """Sentences from dataset columns (tags already strings); row i keeps i as its line."""
    if len(tokens) != len(tags):
        raise DataError(f"{source}: {len(tokens)} token rows but {len(tags)} tag rows")
    sentences = []
    for row, (row_tokens, row_tags) in enumerate(zip(tokens, tags, strict=True)):
        if len(row_tokens) != len(row_tags):
            raise DataError(
                f"{source} row {row}: {len(row_tokens)} tokens but {len(row_tags)} tags"
            )
        if row_tokens:
            sentence = Sentence(tuple(row_tokens), tuple(row_tags), source, row, from_dataset=True)
            sentences.append(sentence)
    return sentences


def check_tags(sentences: Sequence[Sentence], repair: bool) -> TagCheck:
    """Require IOB2 tags; I- tags that start an entity fail, or become B- when `repair`."""
    for sentence in sentences:
        _check_scheme(sentence)
    starts = [(s, i) for s in sentences for i in _entity_starting_inside_tags(s.tags)]
    if starts and not repair:
        sentence, index = starts[0]
        raise DataError(
            f"{len(starts)} I- tags start an entity (after O, another type or at a sentence "
            f"start), first at {sentence.where(index)}: '{sentence.tags[index]}'; "
            "set task.repair_iob=true to rewrite them as B-"
        )
    return TagCheck([_repair(s) for s in sentences], len(starts))


def _check_scheme(sentence: Sentence) -> None:
    for index, tag in enumerate(sentence.tags):
        if not IOB2_TAG.fullmatch(tag):
            raise DataError(
                f"{sentence.where(index)}: tag '{tag}' is not in the IOB2 scheme "
                "(O, B-<type>, I-<type>); convert BIOES/IOB1 or bare types first"
            )


def _entity_starting_inside_tags(tags: Sequence[str]) -> list[int]:
    """Indexes of I-X tags not preceded by B-X or I-X."""
    return [
        index
        for index, tag in enumerate(tags)
        if tag.startswith("I-") and (index == 0 or tags[index - 1][2:] != tag[2:])
    ]


def repaired_tags(tags: Sequence[str]) -> list[str]:
    """`tags` with every I-X that does not continue an X entity rewritten as B-X."""
    bad = set(_entity_starting_inside_tags(tags))
    return ["B-" + tag[2:] if i in bad else tag for i, tag in enumerate(tags)]


def _repair(sentence: Sentence) -> Sentence:
    tags = tuple(repaired_tags(sentence.tags))
    return sentence if tags == sentence.tags else replace(sentence, tags=tags)


def entity_types(tags: Iterable[str]) -> list[str]:
    """Sorted entity types named by B- and I- tags."""
    return sorted({tag[2:] for tag in tags if tag.startswith(ENTITY_PREFIXES)})


def tag_labels(types: Iterable[str]) -> list[str]:
    """Label list for a token classifier: O, then B-/I- for each type in sorted order."""
    return ["O"] + [f"{prefix}{name}" for name in sorted(set(types)) for prefix in ENTITY_PREFIXES]


def sentence_types(sentence: Sentence) -> set[str]:
    """Entity types present in a sentence."""
    return set(entity_types(sentence.tags))


def stratified_split(
    sentences: Sequence[Sentence], sizes: Mapping[str, int], seed: int
) -> dict[str, list[Sentence]]:
    """Split into parts of exactly `sizes`, seeded, so entity types reach every part.

    Greedy: after a seeded shuffle, each part lacking a type (rarest first) takes one unused
    sentence with it, then the rest fill the remaining room. A type in fewer sentences than
    there are parts cannot be everywhere and is placed where it can; `missing_types` reports
    such gaps. Each part keeps the original sentence order.
    """
    _check_sizes(sizes, len(sentences))
    order = list(range(len(sentences)))
    random.Random(seed).shuffle(order)
    types_of = [sentence_types(s) for s in sentences]
    parts: dict[str, list[int]] = {name: [] for name in sizes}
    unused = dict.fromkeys(order)  # insertion-ordered set, in shuffled order
    for entity_type in _types_rarest_first(types_of):
        for name, members in parts.items():
            if len(members) < sizes[name] and not _has_type(members, types_of, entity_type):
                pick = next((i for i in unused if entity_type in types_of[i]), None)
                if pick is None:
                    break
                members.append(pick)
                del unused[pick]
    rest = iter(unused)
    for name, members in parts.items():
        members.extend(next(rest) for _ in range(sizes[name] - len(members)))
    return {name: [sentences[i] for i in sorted(members)] for name, members in parts.items()}


def _check_sizes(sizes: Mapping[str, int], total: int) -> None:
    if any(size < 0 for size in sizes.values()) or sum(sizes.values()) != total:
        raise ValueError(f"split sizes {dict(sizes)} must be non-negative and sum to {total}")


def _types_rarest_first(types_of: Sequence[set[str]]) -> list[str]:
    counts: dict[str, int] = {}
    for types in types_of:
        for entity_type in types:
            counts[entity_type] = counts.get(entity_type, 0) + 1
    return sorted(counts, key=lambda entity_type: (counts[entity_type], entity_type))


def _has_type(members: Sequence[int], types_of: Sequence[set[str]], entity_type: str) -> bool:
    return any(entity_type in types_of[i] for i in members)


def split_fractions(
    sentences: Sequence[Sentence], fractions: Mapping[str, float], seed: int
) -> dict[str, list[Sentence]]:
    """`stratified_split` with round(fraction * n) per part; the 'train' part takes the rest."""
    if REMAINDER_PART not in fractions:
        raise ValueError(f"fractions {dict(fractions)} need a '{REMAINDER_PART}' part")
    total = len(sentences)
    sizes = {
        name: round(fraction * total)
        for name, fraction in fractions.items()
        if name != REMAINDER_PART
    }
    sizes[REMAINDER_PART] = total - sum(sizes.values())
    ordered = {name: sizes[name] for name in fractions}
    return stratified_split(sentences, ordered, seed)


def missing_types(parts: Mapping[str, Sequence[Sentence]]) -> dict[str, list[str]]:
    """Per part, the entity types found in some part but absent from it (gaps only)."""
    present = {
        name: set().union(*(sentence_types(s) for s in members)) for name, members in parts.items()
    }
    everywhere = set().union(*present.values())
    gaps = {name: sorted(everywhere - types) for name, types in present.items()}
    return {name: missing for name, missing in gaps.items() if missing}
