"""`trimflow predict`: csv, jsonl and parquet files scored by a tiny BERT classifier and tagger,
read in small chunks, against the same `VariantModel` predicting the texts in this process."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY_LABELS, TINY_TAGS, build_tiny_bert, build_tiny_tagger, perturbed

from trimflow.cli import main
from trimflow.config.loading import write_params
from trimflow.data.errors import DataError
from trimflow.models.loading import save_model_dir
from trimflow.serving.batch_predict import predict_file
from trimflow.serving.pyfunc import VariantModel

TEXTS = [
    "oil prices rose sharply on opec news",
    "wheat exports fell",
    "the central bank cut interest rates again to support the currency",
    "Kuala Lumpur and Wolfsburg signed a trade deal",
    "copper",
    "quarterly earnings beat forecasts, the company said on Tuesday",
    "wheat " * 300,  # more word pieces than the tiny model's 128 positions: truncated
]
CHUNK_ROWS = 3  # several chunks, one of them partial
TOO_LONG = "x" * 10_001  # over the pyfunc's default max_chars


@pytest.fixture(scope="module")
def project(tmp_path_factory, packaged_tokenizer) -> Path:
    """A project folder: models/tiny (classifier), models/tagger (NER) and params.yaml."""
    root = tmp_path_factory.mktemp("predict-project")
    classifier = perturbed(build_tiny_bert(), scale=0.5)
    save_model_dir(classifier, packaged_tokenizer, {"labels": TINY_LABELS}, root / "models/tiny")
    tagger = perturbed(build_tiny_tagger(), scale=0.2)
    save_model_dir(tagger, packaged_tokenizer, {"labels": TINY_TAGS}, root / "models/tagger")
    write_params([], root / "params.yaml")
    return root


@pytest.fixture(scope="module")
def classifier(project) -> VariantModel:
    return VariantModel().load(project / "models/tiny")


@pytest.fixture(scope="module")
def tagger(project) -> VariantModel:
    return VariantModel().load(project / "models/tagger")


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """`frame` as a csv, jsonl or parquet file, by `path`'s suffix."""
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_json(path, orient="records", lines=True)
    return path


def read_table(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return pd.read_json(path, lines=True, dtype=False)


def assert_predictions(output: pd.DataFrame, rows: list[dict]) -> None:
    """`output`'s label, score and truncated are `rows` (scores up to padding noise)."""
    assert len(output) == len(rows)
    for (_, scored), row in zip(output.iterrows(), rows, strict=True):
        assert scored["label"] == row["label"]
        assert str(scored["truncated"]) == str(row["truncated"])  # csv cells are text
        assert float(scored["score"]) == pytest.approx(row["score"], abs=1e-5)


def no_leftovers(folder: Path) -> list[str]:
    """The temporary outputs left in `folder` (there should be none)."""
    return [path.name for path in folder.iterdir() if ".tmp-" in path.name]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_file_round_trips_keeping_its_other_columns(classifier, tmp_path, suffix):
    frame = pd.DataFrame(
        {
            "id": range(101, 101 + len(TEXTS)),
            "text": TEXTS,
            "note": ['a, "quoted" note', "été", "", "x", "line\nbreak", "0042", "n/a"],
        }
    )
    source = write_table(frame, tmp_path / f"in{suffix}")
    summary = predict_file(classifier, source, tmp_path / f"out{suffix}", chunk_rows=CHUNK_ROWS)
    output = read_table(tmp_path / f"out{suffix}")
    assert list(output.columns) == ["id", "text", "note", "label", "score", "truncated", "error"]
    kept = read_table(source)[["id", "text", "note"]]
    pd.testing.assert_frame_equal(output[kept.columns], kept)
    assert_predictions(output, classifier.predict_texts(TEXTS))
    assert output["truncated"].astype(str).tolist()[-1] == "True"
    assert output["error"].isna().all() if suffix != ".csv" else (output["error"] == "").all()
    assert (summary.rows, summary.scored, summary.first_bad) == (len(TEXTS), len(TEXTS), [])


def test_bad_rows_are_reported_by_number_and_the_others_scored(classifier, tmp_path):
    lines = [
        json.dumps({"id": 1, "text": TEXTS[0]}),
        json.dumps({"id": 2, "text": ""}),
        json.dumps({"id": 3, "text": TEXTS[1]}),
        json.dumps({"id": 4, "text": None}),
        json.dumps({"id": 5, "text": 42}),
        '{"id": 6, "text": "unterminated',
        json.dumps({"id": 7, "text": TOO_LONG}),
        "",
        json.dumps({"id": 9, "text": "   "}),
        json.dumps({"id": 10}),
        json.dumps({"id": 11, "text": TEXTS[2]}),
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    summary = predict_file(classifier, source, tmp_path / "out.jsonl", chunk_rows=CHUNK_ROWS)

    output = read_table(tmp_path / "out.jsonl")
    errors = dict(zip(range(1, len(output) + 1), output["error"], strict=True))
    assert {row: error for row, error in errors.items() if pd.notna(error)} == {
        2: "text is empty",
        4: "text is missing (null)",
        5: "text is a int, not a string",
        6: "line is not valid JSON: Unterminated string starting at: line 1 column 19 (char 18)",
        7: "text has 10001 characters, more than max_chars=10000",
        8: "line is blank",
        9: "text is empty",
        10: "text is missing (null)",
    }
    assert (summary.rows, summary.scored, summary.bad) == (11, 3, 8)
    assert summary.first_bad == [(row, errors[row]) for row in (2, 4, 5, 6, 7)]
    assert "and 3 more" in summary.lines()[1]
    good = output[output["error"].isna()]
    assert good["id"].tolist() == [1, 3, 11]
    assert_predictions(good, classifier.predict_texts([TEXTS[0], TEXTS[1], TEXTS[2]]))
    assert output.loc[output["error"].notna(), "label"].isna().all()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet_bad_rows(classifier, tmp_path, suffix):
    texts = [TEXTS[0], "", TOO_LONG, TEXTS[3]] if suffix == ".csv" else [TEXTS[0], None, TEXTS[3]]
    source = write_table(pd.DataFrame({"text": texts}), tmp_path / f"in{suffix}")
    summary = predict_file(classifier, source, tmp_path / f"out{suffix}", chunk_rows=2)
    bad = [(2, "text is empty"), (3, "text has 10001 characters, more than max_chars=10000")]
    assert summary.first_bad == (bad if suffix == ".csv" else [(2, "text is missing (null)")])
    output = read_table(tmp_path / f"out{suffix}")
    assert_predictions(output.iloc[[0, -1]], classifier.predict_texts([TEXTS[0], TEXTS[3]]))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".csv"])
def test_ner_output_lists_the_entities_of_each_text(tagger, tmp_path, suffix):
    source = write_table(pd.DataFrame({"text": TEXTS, "n": range(len(TEXTS))}), tmp_path / "in.csv")
    predict_file(tagger, source, tmp_path / f"out{suffix}", chunk_rows=CHUNK_ROWS)
    output = read_table(tmp_path / f"out{suffix}")
    assert list(output.columns) == ["text", "n", "entities", "truncated", "error"]
    entities = output["entities"].tolist()
    if suffix == ".csv":
        entities = [json.loads(cell) for cell in entities]
    elif suffix == ".parquet":
        entities = [[dict(entity) for entity in cell] for cell in entities]
    expected = tagger.predict_texts(TEXTS)
    assert any(row["entities"] for row in expected)
    for got, want in zip(entities, expected, strict=True):
        assert [
            {**e, "score": pytest.approx(e["score"], abs=1e-5)} for e in want["entities"]
        ] == got


@pytest.mark.parametrize(
    ("input_name", "output_name", "message"),
    [
        ("in.txt", "out.csv", "in.txt: unknown file format '.txt'; use .csv, .jsonl"),
        ("in.csv", "out.xlsx", "out.xlsx: unknown file format '.xlsx'"),
        (
            "in.csv",
            "out.csv",
            "in.csv: no column 'text' \\(pass --text-column\\); its columns: a, b",
        ),
    ],
)
def test_bad_files_are_refused_naming_them(classifier, tmp_path, input_name, output_name, message):
    (tmp_path / input_name).write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=message):
        predict_file(classifier, tmp_path / input_name, tmp_path / output_name)
    assert not (tmp_path / output_name).exists()
    assert no_leftovers(tmp_path) == []


def test_a_failure_midway_leaves_the_previous_output_alone(classifier, tmp_path):
    source = tmp_path / "in.jsonl"
    rows = [{"text": text} for text in TEXTS[:4]] + [{"text": TEXTS[4], "late": 1}]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out.jsonl"
    output.write_text("the previous output\n")
    with pytest.raises(DataError, match="rows 5-5 have keys that no row of the first 4 has: late"):
        predict_file(classifier, source, output, chunk_rows=4)
    assert output.read_text() == "the previous output\n"
    assert no_leftovers(tmp_path) == []


def test_the_cli_exit_status(project, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(project)
    good = write_table(pd.DataFrame({"body": [TEXTS[0], ""]}), tmp_path / "good.csv")
    bad = write_table(pd.DataFrame({"body": ["", " "]}), tmp_path / "bad.csv")
    out = tmp_path / "out.parquet"

    def predict(*arguments: str) -> int:
        return main(["predict", "--variant", "tiny", "--text-column", "body", *arguments])

    with caplog.at_level(logging.INFO):
        assert predict("--input", str(good), "--output", str(out), "--batch-size", "1") == 0
    assert "2 rows, 1 scored, 1 bad" in caplog.text
    assert "row 2: text is empty" in caplog.text
    assert pd.read_parquet(out)["label"].notna().tolist() == [True, False]

    assert predict("--input", str(bad), "--output", str(tmp_path / "all_bad.csv")) == 2
    assert "no row of" in caplog.text
    assert read_table(tmp_path / "all_bad.csv")["error"].tolist() == ["text is empty"] * 2

    caplog.clear()
    assert (
        predict("--input", str(good), "--output", str(tmp_path / "o.csv"), "evaluate.typo=1") == 2
    )
    assert "evaluate.typo: unknown key" in caplog.text
    assert predict("--input", str(tmp_path / "none.csv"), "--output", str(out)) == 2
    assert "none.csv: no such file" in caplog.text
    assert main(["predict", "--variant", "nope", "--input", str(good), "--output", "x.csv"]) == 2
    assert "no such variant" in caplog.text
    assert main(["predict", "--variant", "tiny", "--input", str(good), "--output", "x.csv"]) == 2
    assert "no column 'text'" in caplog.text
    assert not (project / "x.csv").exists() and no_leftovers(project) == []


def test_a_project_variant_scores_at_the_temperature_evaluate_fitted(
    project, tmp_path, monkeypatch, caplog
):
    """`--variant` reads reports/metrics.json's temperature (1.0 without one)."""
    monkeypatch.chdir(project)
    source = write_table(pd.DataFrame({"text": TEXTS[:3]}), tmp_path / "in.csv")

    def scores(name: str) -> list[float]:
        output = tmp_path / f"{name}.csv"
        assert (
            main(["predict", "--variant", "tiny", "--input", str(source), "--output", str(output)])
            == 0
        )
        return read_table(output)["score"].astype(float).tolist()

    plain = scores("plain")
    metrics = project / "reports" / "metrics.json"
    metrics.parent.mkdir(exist_ok=True)
    metrics.write_text(json.dumps({"variants": {"tiny": {"temperature": 3.0}}}))
    try:
        with caplog.at_level(logging.INFO):
            softened = scores("softened")
    finally:
        metrics.unlink()
    assert "tiny: scores at temperature 3.000" in caplog.text
    assert all(soft < sharp for soft, sharp in zip(softened, plain, strict=True))
    assert all(score > 1 / len(TINY_LABELS) for score in softened)
