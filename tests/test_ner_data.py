"""The NER data path through the real prepare and tokenize stages (task=ner)."""

from __future__ import annotations

import json
import re
from collections import Counter

import datasets
import pandas as pd
import pytest

from trimflow.config.loading import compose_config
from trimflow.data.errors import DataError
from trimflow.layout import dvc_layout
from trimflow.stages import prepare, tokenize

SPLITS = ("train", "validation", "test")
COLUMNS = ["tokens", "tags", "tag_ids", "text"]
TYPES = ("PER", "LOC", "ORG")
NAMES = {
    "PER": ["Ann", "Bob Marley", "Chandrasekhar", "Dmitri Ivanovich Mendeleev", "Eve"],
    "LOC": ["Paris", "New Zealand", "Wollongong", "Ouagadougou"],
    "ORG": ["Acme", "United Nations", "Volkswagen"],
}
LABELS = ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]

Pairs = list[tuple[str, str]]


def entity(entity_type: str, index: int) -> Pairs:
    words = NAMES[entity_type][index % len(NAMES[entity_type])].split()
    return [(word, ("B-" if k == 0 else "I-") + entity_type) for k, word in enumerate(words)]


def sentence(i: int) -> Pairs:
    """A distinct sentence (marker n<i>) with one entity of TYPES[i % 3], a second when i even."""
    words = [("Report", "O"), (f"n{i}", "O"), *entity(TYPES[i % 3], i), ("arrived", "O")]
    words += [("yesterday", "O")] * (i % 4)
    if i % 2 == 0:
        words += [("near", "O"), *entity(TYPES[(i + 1) % 3], i // 2)]
    return words


def conll_text(sentences: list[Pairs]) -> str:
    return "".join("".join(f"{t}\t{g}\n" for t, g in s) + "\n" for s in sentences)


def line_of(sentences: list[Pairs], index: int, token: int = 0) -> int:
    """1-based file line of token `token` of sentence `index` in `conll_text(sentences)`."""
    return sum(len(s) + 1 for s in sentences[:index]) + token + 1


def text_of(pairs: Pairs) -> str:
    return " ".join(token for token, _ in pairs)


def write(tmp_path, name: str, sentences: list[Pairs]):
    path = tmp_path / name
    path.write_text(conll_text(sentences), encoding="utf-8")
    return path


def ner_config(train, test=None, *overrides: str):
    return compose_config(
        [
            "task=ner",
            f"dataset.train={train}",
            f"dataset.test={test}" if test is not None else "dataset.test=null",
            "tracking.enabled=false",
            *overrides,
        ]
    )


def read_split(layout, split: str) -> pd.DataFrame:
    return pd.read_parquet(layout.prepared / f"{split}.parquet")


def read_json(path):
    return json.loads(path.read_text())


def types_in(frame: pd.DataFrame) -> set[str]:
    return {tag[2:] for tags in frame["tags"] for tag in tags if tag != "O"}


def b_counts(frame: pd.DataFrame) -> dict[str, int]:
    counts = Counter(tag[2:] for tags in frame["tags"] for tag in tags if tag.startswith("B-"))
    return dict(sorted(counts.items()))


def snapshot(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# 1. Local CoNLL files with a test file


def test_prepare_conll_files_writes_splits_labels_and_card(tmp_path):
    train_sentences = [sentence(i) for i in range(30)]
    test_sentences = [sentence(i) for i in range(100, 106)]
    cfg = ner_config(
        write(tmp_path, "train.txt", train_sentences),
        write(tmp_path, "test.txt", test_sentences),
    )
    layout = dvc_layout(tmp_path / "run")
    prepare.run(cfg, layout)

    labels = read_json(layout.prepared / "label_map.json")["labels"]
    assert labels == LABELS
    frames = {split: read_split(layout, split) for split in SPLITS}
    source_tags = {text_of(s): [g for _, g in s] for s in train_sentences + test_sentences}
    for frame in frames.values():
        assert list(frame.columns) == COLUMNS
        for tokens, tags, tag_ids, text in frame[COLUMNS].itertuples(index=False):
            assert text == " ".join(tokens)
            assert list(tags) == source_tags[text]
            assert [labels[i] for i in tag_ids] == list(tags)

    # Test is the test file, in order; validation is cut from train with every type.
    assert list(frames["test"]["text"]) == [text_of(s) for s in test_sentences]
    train_texts, validation_texts = set(frames["train"]["text"]), set(frames["validation"]["text"])
    assert len(validation_texts) == round(cfg.dataset.validation_fraction * 30) == 3
    assert not train_texts & validation_texts
    assert train_texts | validation_texts == {text_of(s) for s in train_sentences}
    assert len(frames["train"]) == 27
    assert types_in(frames["validation"]) == set(TYPES)

    card = read_json(layout.prepared / "card.json")
    assert card["repaired_iob_tags"] == 0
    assert card["labels"] == LABELS
    for split, frame in frames.items():
        assert card["splits"][split]["rows"] == len(frame)
        assert card["splits"][split]["entities"] == b_counts(frame)
    train_file_entities = Counter(
        g[2:] for s in train_sentences for _, g in s if g.startswith("B-")
    )
    assert (
        Counter(card["splits"]["train"]["entities"])
        + Counter(card["splits"]["validation"]["entities"])
        == train_file_entities
    )
    assert card["splits"]["test"]["entities"] == {"LOC": 3, "ORG": 3, "PER": 3}


# 2. No test file: the test split is cut from train too


def test_prepare_without_test_file_cuts_seeded_splits_with_every_type(tmp_path):
    train_sentences = [sentence(i) for i in range(30)]
    train = write(tmp_path, "train.txt", train_sentences)

    def prepared_texts(name: str, *overrides: str):
        layout = dvc_layout(tmp_path / name)
        prepare.run(ner_config(train, None, *overrides), layout)
        return {split: list(read_split(layout, split)["text"]) for split in SPLITS}, layout

    first, layout = prepared_texts("a", "seed=1", "dataset.test_fraction=0.2")
    assert {split: len(texts) for split, texts in first.items()} == {
        "train": 21,
        "validation": 3,
        "test": 6,
    }
    every = [text for texts in first.values() for text in texts]
    assert sorted(every) == sorted(text_of(s) for s in train_sentences)
    for split in SPLITS:
        assert types_in(read_split(layout, split)) == set(TYPES), split

    again, _ = prepared_texts("b", "seed=1", "dataset.test_fraction=0.2")
    assert again == first
    other, _ = prepared_texts("c", "seed=2", "dataset.test_fraction=0.2")
    assert other != first
    assert {split: len(texts) for split, texts in other.items()} == {
        "train": 21,
        "validation": 3,
        "test": 6,
    }
    larger, _ = prepared_texts("d", "seed=1", "dataset.test_fraction=0.3")
    assert len(larger["test"]) == 9


# 3. Tag errors name file and line; repair; failed prepare keeps previous output


def test_line_without_tag_names_file_and_line(tmp_path):
    sentences = [sentence(i) for i in range(6)]
    path = write(tmp_path, "train.txt", sentences)
    lines = path.read_text().split("\n")
    bad = line_of(sentences, 3, 2)
    lines[bad - 1] = lines[bad - 1].split("\t")[0]
    path.write_text("\n".join(lines))
    test = write(tmp_path, "test.txt", [sentence(100)])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:{bad}: no tag after token"):
        prepare.run(ner_config(path, test), dvc_layout(tmp_path))


def test_unknown_tag_scheme_names_file_and_line(tmp_path):
    sentences = [sentence(i) for i in range(6)]
    sentences[4][2] = (sentences[4][2][0], "S-PER")
    train = write(tmp_path, "train.txt", sentences)
    test = write(tmp_path, "test.txt", [sentence(100)])
    where = rf"{re.escape(str(train))}:{line_of(sentences, 4, 2)}"
    with pytest.raises(DataError, match=rf"{where}: tag 'S-PER' is not in the IOB2 scheme"):
        prepare.run(ner_config(train, test), dvc_layout(tmp_path))


def iob_broken_files(tmp_path):
    """Train with two entity-starting I- tags (after O; at a sentence start), test with one."""
    train_sentences = [sentence(i) for i in range(12)]
    after_o = [("Report", "O"), ("x1", "O"), ("Lyon", "I-LOC"), ("today", "O")]
    at_start = [("Acme", "I-ORG"), ("Corp", "I-ORG"), ("said", "O"), ("x2", "O")]
    train_sentences[5:5] = [after_o, at_start]
    test_sentences = [sentence(100), [("x3", "O"), ("Eve", "I-PER")]]
    train = write(tmp_path, "train.txt", train_sentences)
    test = write(tmp_path, "test.txt", test_sentences)
    return train, test, line_of(train_sentences, 5, 2)


def test_entity_starting_i_tag_fails_with_count_location_and_hint(tmp_path):
    train, test, first = iob_broken_files(tmp_path)
    with pytest.raises(DataError) as caught:
        prepare.run(ner_config(train, test), dvc_layout(tmp_path))
    message = str(caught.value)
    assert message.startswith("2 I- tags start an entity")
    assert f"first at {train}:{first}: 'I-LOC'" in message
    assert "set task.repair_iob=true" in message


def test_repair_iob_rewrites_entity_starts_and_records_the_count(tmp_path):
    train, test, _ = iob_broken_files(tmp_path)
    layout = dvc_layout(tmp_path / "run")
    prepare.run(ner_config(train, test, "task.repair_iob=true"), layout)
    tags = {
        text: list(tags)
        for split in SPLITS
        for text, tags in read_split(layout, split)[["text", "tags"]].itertuples(index=False)
    }
    assert tags["Report x1 Lyon today"] == ["O", "O", "B-LOC", "O"]
    assert tags["Acme Corp said x2"] == ["B-ORG", "I-ORG", "O", "O"]
    assert tags["x3 Eve"] == ["O", "B-PER"]
    assert read_json(layout.prepared / "card.json")["repaired_iob_tags"] == 3
    labels = read_json(layout.prepared / "label_map.json")["labels"]
    assert not [tag for tag in labels if tag not in LABELS]


def test_failed_ner_prepare_leaves_previous_output_untouched(tmp_path):
    layout = dvc_layout(tmp_path / "run")
    test = write(tmp_path, "test.txt", [sentence(i) for i in range(100, 104)])
    good = write(tmp_path, "good.txt", [sentence(i) for i in range(20)])
    prepare.run(ner_config(good, test), layout)
    before = snapshot(layout.prepared)
    assert set(before) == {"train.parquet", "validation.parquet", "test.parquet"} | {
        "label_map.json",
        "card.json",
    }
    broken = [sentence(i) for i in range(20)]
    broken[7][0] = ("Report", "S-LOC")
    bad = write(tmp_path, "bad.txt", broken)
    with pytest.raises(DataError, match="S-LOC"):
        prepare.run(ner_config(bad, test), layout)
    assert snapshot(layout.prepared) == before
    assert not [p for p in layout.prepared.parent.iterdir() if ".tmp-" in p.name]


# 4. Entity types unseen in train


def test_test_entity_type_missing_from_train_names_type_and_location(tmp_path):
    train = write(tmp_path, "train.txt", [sentence(i) for i in range(12)])
    test_sentences = [sentence(100), sentence(101)]
    test_sentences.append([("Fans", "O"), ("of", "O"), ("Python", "B-MISC"), ("cheer", "O")])
    test = write(tmp_path, "test.txt", test_sentences)
    where = rf"{re.escape(str(test))}:{line_of(test_sentences, 2, token=2)}"  # the B-MISC line
    message = rf"{where}: test entity type 'MISC' is missing from train"
    with pytest.raises(DataError, match=message):
        prepare.run(ner_config(train, test), dvc_layout(tmp_path))


# 5. Hugging Face datasets with ClassLabel tags

HF_NAMES = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]  # not sorted


def hf_dataset_dir(tmp_path, train_sentences, test_sentences):
    features = datasets.Features(
        {
            "tokens": datasets.List(datasets.Value("string")),
            "ner_tags": datasets.List(datasets.ClassLabel(names=HF_NAMES)),
        }
    )
    directory = tmp_path / "hf-ner"
    directory.mkdir()
    for split, sentences in (("train", train_sentences), ("test", test_sentences)):
        datasets.Dataset.from_dict(
            {
                "tokens": [[t for t, _ in s] for s in sentences],
                "ner_tags": [[HF_NAMES.index(g) for _, g in s] for s in sentences],
            },
            features=features,
        ).to_parquet(str(directory / f"{split}.parquet"))
    return directory


def hf_config(directory, *overrides: str):
    return compose_config(
        [
            "task=ner",
            "dataset=hf",
            f"dataset.name={directory}",
            "dataset.text_column=tokens",
            "dataset.label_column=ner_tags",
            "tracking.enabled=false",
            *overrides,
        ]
    )


def test_hf_class_label_tags_become_names(tmp_path):
    train_sentences = [sentence(i) for i in range(20)]
    test_sentences = [sentence(i) for i in range(100, 104)]
    directory = hf_dataset_dir(tmp_path, train_sentences, test_sentences)
    restored = datasets.load_dataset(str(directory), split="train").features["ner_tags"]
    assert restored.feature.names == HF_NAMES  # parquet metadata keeps the ClassLabel

    cfg = hf_config(directory)
    assert (cfg.dataset.source, cfg.dataset.name) == ("hf", str(directory))
    layout = dvc_layout(tmp_path / "run")
    prepare.run(cfg, layout)
    labels = read_json(layout.prepared / "label_map.json")["labels"]
    assert labels == LABELS
    test = read_split(layout, "test")
    assert [list(tags) for tags in test["tags"]] == [[g for _, g in s] for s in test_sentences]
    for split in SPLITS:
        frame = read_split(layout, split)
        assert types_in(frame) == set(TYPES)
        for tags, tag_ids in frame[["tags", "tag_ids"]].itertuples(index=False):
            assert [labels[i] for i in tag_ids] == list(tags)
    train_texts = set(read_split(layout, "train")["text"]) | set(
        read_split(layout, "validation")["text"]
    )
    assert train_texts == {text_of(s) for s in train_sentences}


def test_hf_missing_label_column_names_the_key(tmp_path):
    directory = hf_dataset_dir(tmp_path, [sentence(i) for i in range(6)], [sentence(100)])
    cfg = hf_config(directory, "dataset.label_column=labels")
    with pytest.raises(DataError, match=r"column 'labels' \(dataset\.label_column\) not found"):
        prepare.run(cfg, dvc_layout(tmp_path))


# 6. tokenize after prepare: truncation counted, labels aligned


def long_sentence(i: int) -> Pairs:
    """Longer sentences with multi-piece words and entities late, so max_length cuts them."""
    words = sentence(i) + [("Ouagadougouvillianism", "O")] * (i % 3)
    if i % 3 == 1:
        words += [("with", "O"), *entity("PER", i), *entity("ORG", i)]
    return words


def expected_encoding(tokens, tag_ids, tokenizer, max_length: int) -> dict:
    """The encoding of one sentence built word by word, and what truncation cut from it."""
    pieces = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in tokens]
    assert all(pieces), "every word has at least one piece"
    budget = max_length - 2
    ids, word_ids, labels = [], [], []
    for word, word_pieces in enumerate(pieces):
        for k, piece in enumerate(word_pieces):
            ids.append(piece)
            word_ids.append(word)
            labels.append(int(tag_ids[word]) if k == 0 else -100)
    kept_words = set(word_ids[:budget])
    cut = set(range(len(tokens))) - kept_words
    return {
        "input_ids": [tokenizer.cls_token_id, *ids[:budget], tokenizer.sep_token_id],
        "word_ids": [-1, *word_ids[:budget], -1],
        "labels": [-100, *labels[:budget], -100],
        "cut": cut,
    }


def entity_spans(tags) -> list[range]:
    spans, start = [], None
    for index, tag in enumerate([*tags, "O"]):
        if start is not None and not (tag.startswith("I-") and tag[2:] == tags[start][2:]):
            spans.append(range(start, index))
            start = None
        if tag.startswith("B-"):
            start = index
    return spans


def test_tokenize_counts_cut_words_and_entities_and_aligns_labels(tmp_path, packaged_tokenizer):
    max_length = 12
    train = write(tmp_path, "train.txt", [long_sentence(i) for i in range(30)])
    test = write(tmp_path, "test.txt", [long_sentence(i) for i in range(100, 109)])
    cfg = ner_config(train, test, f"model.max_length={max_length}")
    layout = dvc_layout(tmp_path / "run")
    prepare.run(cfg, layout)
    tokenize.run(cfg, layout)

    stats = read_json(layout.tokenized / "tokenization.json")
    assert stats["max_length"] == max_length
    saved = datasets.load_from_disk(str(layout.tokenized_splits))
    assert set(saved) == set(SPLITS)
    for split in SPLITS:
        frame = read_split(layout, split)
        data = saved[split]
        assert len(data) == len(frame)
        assert {"input_ids", "labels", "word_ids", "num_words", "length"} <= set(data.column_names)
        truncated = words_cut = entities_cut = 0
        for row, (tokens, tags, tag_ids) in enumerate(
            frame[["tokens", "tags", "tag_ids"]].itertuples(index=False)
        ):
            expected = expected_encoding(list(tokens), tag_ids, packaged_tokenizer, max_length)
            got = data[row]
            assert got["input_ids"] == expected["input_ids"], (split, row)
            assert got["word_ids"] == expected["word_ids"], (split, row)
            assert got["labels"] == expected["labels"], (split, row)
            assert got["num_words"] == len(tokens)
            assert got["length"] == len(expected["input_ids"])
            cut = expected["cut"]
            truncated += bool(cut)
            words_cut += len(cut)
            entities_cut += sum(bool(cut & set(span)) for span in entity_spans(list(tags)))
        assert stats["splits"][split]["examples"] == len(frame)
        assert stats["splits"][split]["truncated"] == truncated, split
        assert stats["splits"][split]["words_cut"] == words_cut, split
        assert stats["splits"][split]["entities_cut"] == entities_cut, split
        if split != "validation":
            assert truncated and words_cut > truncated and entities_cut, split
    assert read_json(layout.tokenized / "label_map.json")["labels"] == LABELS


# 7. The embedded WNUT-16 default


def test_embedded_wnut16_prepares_into_three_splits_with_every_type(tmp_path):
    cfg = compose_config(["task=ner", "tracking.enabled=false"])
    layout = dvc_layout(tmp_path)
    prepare.run(cfg, layout)
    frames = {split: read_split(layout, split) for split in SPLITS}
    assert sum(len(frame) for frame in frames.values()) == 2394
    assert len(frames["test"]) == round(0.2 * 2394)
    assert len(frames["validation"]) == round(0.1 * 2394)
    labels = read_json(layout.prepared / "label_map.json")["labels"]
    types = {label[2:] for label in labels if label != "O"}
    assert len(types) == 10 and len(labels) == 21
    for split, frame in frames.items():
        assert types_in(frame) == types, split
    card = read_json(layout.prepared / "card.json")
    assert card["dataset"] == "wnut16"
    assert {split: card["splits"][split]["rows"] for split in SPLITS} == {
        split: len(frame) for split, frame in frames.items()
    }
    assert all(len(card["splits"][split]["entities"]) == 10 for split in SPLITS)


def test_too_few_sentences_for_a_split_is_a_clear_error(tmp_path):
    train = write(tmp_path, "train.txt", [sentence(i) for i in range(4)])
    test = write(tmp_path, "test.txt", [sentence(100)])
    with pytest.raises(DataError, match="validation split is empty: 4 sentences are too few"):
        prepare.run(ner_config(train, test), dvc_layout(tmp_path))
