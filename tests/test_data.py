"""Readers, validation errors that name file and row, splits, and the prepare stage."""

from __future__ import annotations

import json
from typing import get_args

import pandas as pd
import pytest

from trimflow.config.loading import compose_config
from trimflow.config.schema import DatasetConfig
from trimflow.data.errors import DataError
from trimflow.data.sources import SOURCES, load_raw_splits
from trimflow.data.splits import split_validation, subsample
from trimflow.layout import dvc_layout
from trimflow.stages import prepare

TOPICS = {
    "oil": "crude oil barrels opec output prices",
    "grain": "wheat corn harvest tonnes export",
    "money": "currency dollar central bank interest",
}


def topic_rows(count: int, offset: int = 0) -> list[dict[str, str]]:
    """Distinct, learnable rows: each text repeats its topic's words with a unique id."""
    return [
        {"text": f"{words} item {offset + i}", "label": label}
        for i in range(count)
        for label, words in TOPICS.items()
    ]


def write_split(path, rows, fmt):
    frame = pd.DataFrame(rows)
    if fmt == "csv":
        frame.to_csv(path, index=False)
    elif fmt == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


def files_config(tmp_path, train_rows, test_rows, fmt="csv", *overrides):
    train = write_split(tmp_path / f"train.{fmt}", train_rows, fmt)
    test = write_split(tmp_path / f"test.{fmt}", test_rows, fmt)
    return compose_config(
        [
            "dataset=files",
            f"dataset.train={train}",
            f"dataset.test={test}",
            "tracking.enabled=false",
            *overrides,
        ]
    )


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_local_formats_read_the_same(tmp_path, fmt):
    cfg = files_config(tmp_path, topic_rows(4), topic_rows(2, 100), fmt)
    splits = load_raw_splits(cfg.dataset)
    assert list(splits["train"]["label"])[:3] == ["oil", "grain", "money"]
    assert len(splits["test"]) == 6


def test_embedded_r8_reads_with_orange_header():
    splits = load_raw_splits(compose_config().dataset)
    assert (len(splits["train"]), len(splits["test"])) == (5485, 2189)
    assert splits["train"]["row"].iloc[0] == 4  # three header lines precede the data
    assert splits["train"]["label"].nunique() == 8


def test_empty_text_names_file_and_row(tmp_path):
    rows = topic_rows(3)
    rows[4]["text"] = "   "
    cfg = files_config(tmp_path, rows, topic_rows(1))
    with pytest.raises(DataError, match=r"train\.csv: empty text at row 6"):
        prepare.run(cfg, dvc_layout(tmp_path))


def test_non_text_value_is_rejected(tmp_path):
    rows = topic_rows(3)
    rows[2]["text"] = 12345
    cfg = files_config(tmp_path, rows, topic_rows(1), "jsonl")
    with pytest.raises(DataError, match=r"train\.jsonl: non-text value .* row 3"):
        prepare.run(cfg, dvc_layout(tmp_path))


def test_missing_column_names_config_key(tmp_path):
    cfg = files_config(tmp_path, topic_rows(3), topic_rows(1), "csv", "dataset.text_column=body")
    with pytest.raises(DataError, match=r"column 'body' \(dataset\.text_column\)"):
        load_raw_splits(cfg.dataset)


def test_test_label_missing_from_train_fails(tmp_path):
    test_rows = topic_rows(1) + [{"text": "ships and ports", "label": "ship"}]
    cfg = files_config(tmp_path, topic_rows(3), test_rows)
    with pytest.raises(DataError, match=r"test\.csv: test labels missing from train: \['ship'\]"):
        prepare.run(cfg, dvc_layout(tmp_path))


def test_unknown_format_names_the_key(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("x")
    cfg = compose_config(["dataset=files", f"dataset.train={path}", f"dataset.test={path}"])
    with pytest.raises(DataError, match="dataset.format"):
        load_raw_splits(cfg.dataset)


def test_extra_columns_of_a_file_reach_the_prepared_splits(tmp_path):
    """evaluate slices the test split by them (evaluate.slices.columns)."""
    train = [{**row, "region": f"r{i % 2}"} for i, row in enumerate(topic_rows(10))]
    test = [{**row, "region": "north"} for row in topic_rows(2, 100)]
    cfg = files_config(tmp_path, train, test, "csv", "dataset.text_column=text")
    layout = dvc_layout(tmp_path)
    prepare.run(cfg, layout)
    frame = pd.read_parquet(layout.prepared / "test.parquet")
    assert list(frame["region"]) == ["north"] * 6
    assert set(pd.read_parquet(layout.prepared / "train.parquet")["region"]) == {"r0", "r1"}


def test_prepare_writes_splits_card_and_reports_shared_texts(tmp_path):
    train = topic_rows(10)
    test = topic_rows(2, 100) + [dict(train[0])]
    cfg = files_config(tmp_path, train, test, "csv", "dataset.validation_fraction=0.2")
    layout = dvc_layout(tmp_path)
    prepare.run(cfg, layout)
    card = json.loads((layout.prepared / "card.json").read_text())
    assert card["splits"]["train"]["rows"] == 24
    assert card["splits"]["validation"]["per_label"] == {"grain": 2, "money": 2, "oil": 2}
    assert card["train_test_shared_texts"]["count"] == 1
    labels = json.loads((layout.prepared / "label_map.json").read_text())["labels"]
    assert labels == ["grain", "money", "oil"]
    frame = pd.read_parquet(layout.prepared / "train.parquet")
    assert set(frame["label_id"]) == {0, 1, 2}


def test_failed_prepare_leaves_previous_output_untouched(tmp_path):
    layout = dvc_layout(tmp_path)
    prepare.run(files_config(tmp_path, topic_rows(5), topic_rows(2)), layout)
    before = sorted(p.name for p in layout.prepared.iterdir())
    bad = topic_rows(5)
    bad[0]["text"] = ""
    with pytest.raises(DataError):
        prepare.run(files_config(tmp_path, bad, topic_rows(2)), layout)
    assert sorted(p.name for p in layout.prepared.iterdir()) == before
    assert not [p for p in layout.prepared.parent.iterdir() if ".tmp-" in p.name]


def test_hf_source_loads_through_datasets(tmp_path):
    hub_like = tmp_path / "hub-dataset"
    hub_like.mkdir()
    write_split(hub_like / "train.csv", topic_rows(4), "csv")
    write_split(hub_like / "test.csv", topic_rows(2), "csv")
    cfg = compose_config(["dataset=hf", f"dataset.name={hub_like}"])
    splits = load_raw_splits(cfg.dataset)
    assert len(splits["train"]) == 12
    assert splits["test"]["source"].iloc[0] == f"{hub_like}[test]"


def test_hf_source_error_names_dataset(tmp_path):
    cfg = compose_config(["dataset=hf", f"dataset.name={tmp_path / 'nothing-here'}"])
    with pytest.raises(DataError, match="nothing-here"):
        load_raw_splits(cfg.dataset)


def test_the_schema_offers_exactly_the_dataset_sources_of_the_table():
    assert get_args(DatasetConfig.model_fields["source"].annotation) == tuple(SOURCES)


def test_splits_are_stratified_and_seeded():
    frame = pd.DataFrame(topic_rows(20))
    train, validation = split_validation(frame, 0.25, seed=3)
    assert validation["label"].value_counts().to_dict() == {"oil": 5, "grain": 5, "money": 5}
    again, _ = split_validation(frame, 0.25, seed=3)
    assert train.index.equals(again.index)
    assert len(subsample(frame, 30, seed=1)) == 30
    assert subsample(frame, None, seed=1) is frame
