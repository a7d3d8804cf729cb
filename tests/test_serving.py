"""The pyfunc over every variant format, the champion registry, and `mlflow models serve`.

Tiny variants (fp32, torch int8, ONNX Runtime and OpenVINO int8, a token classifier) are logged
as pyfunc models in the session's sqlite store, loaded back with `mlflow.pyfunc.load_model` and
compared with the in-process model; the serving test starts a real scoring server on a fresh store.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from helpers import TINY_TAGS, build_tiny_bert, build_tiny_tagger, perturbed
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from trimflow.compress.quantize import quantize_model, save_quantized
from trimflow.compress.structured import prune_heads, prune_neurons
from trimflow.compress.variants import load_variant, save_onnx_variant, save_openvino_variant
from trimflow.data.token_labels import word_predictions
from trimflow.layout import dvc_layout
from trimflow.models.loading import save_model_dir
from trimflow.serving.pyfunc import VariantModel, log_variant_model
from trimflow.serving.registry import (
    CHAMPION,
    OBJECTIVE_TAG,
    VARIANT_TAG,
    publish_recommended,
    register_recommended,
)
from trimflow.serving.server import ScoringServer, ServerError

CLASSES = ["alpha", "beta", "gamma"]
TEXTS = [
    "oil prices rose sharply on opec news",
    "the company reported higher quarterly earnings",
    "wheat exports fell",
    "central bank cuts interest rates again to support the currency",
    "Kuala Lumpur and Wolfsburg signed a trade deal",
    "shares of the acquired unit jumped",
]
SERVE_MAX_CHARS = 200


def in_process_logits(variant_dir: Path, tokenizer, texts: list[str]) -> torch.Tensor:
    """What the variant predicts when loaded directly, on one padded batch."""
    model = load_variant(variant_dir)
    with torch.inference_mode():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.float()


# --- variant directories and logged models -----------------------------------------------------


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory, packaged_tokenizer) -> dict[str, Path]:
    """fp32, head- and neuron-pruned, torch dynamic int8, ONNX Runtime dynamic int8 and
    OpenVINO int8 classifiers, and a token tagger."""
    root = tmp_path_factory.mktemp("variants")
    names = ("fp32", "pruned", "quantized", "onnx_int8", "openvino_int8", "ner")
    dirs = {name: root / name for name in names}
    model = perturbed(build_tiny_bert(), scale=0.5)
    save_model_dir(model, packaged_tokenizer, {"labels": CLASSES}, dirs["fp32"])
    pruned = copy.deepcopy(model)
    prune_heads(pruned, {0: [1], 1: [0, 3]})
    prune_neurons(pruned, {0: list(range(0, 64, 2))})
    save_model_dir(pruned, packaged_tokenizer, {"labels": CLASSES}, dirs["pruned"])
    save_quantized(quantize_model(model, "dynamic_int8"), dirs["fp32"], dirs["quantized"])
    sample = dict(packaged_tokenizer(TEXTS[:2], padding=True, return_tensors="pt"))
    dirs["onnx_int8"].mkdir()
    save_onnx_variant(model, dirs["fp32"], dirs["onnx_int8"], "onnx_dynamic_int8", sample, [])
    dirs["openvino_int8"].mkdir()
    save_openvino_variant(
        model, dirs["fp32"], dirs["openvino_int8"], "openvino_int8", sample, [sample]
    )
    tagger = perturbed(build_tiny_tagger(), scale=0.2)
    save_model_dir(tagger, packaged_tokenizer, {"labels": TINY_TAGS}, dirs["ner"])
    return dirs


@contextlib.contextmanager
def tracking_to(uri: str, artifacts: Path) -> Iterator[str]:
    """`uri` as MLflow's tracking URI (restored after); yields a new experiment's id."""
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            yield mlflow.create_experiment(artifacts.name, artifacts.as_uri())
        finally:
            mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, tracking_db):
    """This module's experiment in the session's sqlite store, the tracking URI meanwhile."""
    with tracking_to(tracking_db, tmp_path_factory.mktemp("serving-artifacts")) as created:
        yield created


@pytest.fixture(scope="module")
def logged(experiment, variant_dirs) -> dict[str, str]:
    """Each variant logged as a pyfunc in one run: variant -> model URI (plus the run id)."""
    with mlflow.start_run(experiment_id=experiment) as run:
        uris = {name: log_variant_model(path).model_uri for name, path in variant_dirs.items()}
    return {**uris, "run_id": run.info.run_id}


@pytest.fixture(scope="module")
def loaded(logged, variant_dirs):
    """The logged models loaded back through MLflow."""
    return {name: mlflow.pyfunc.load_model(logged[name]) for name in variant_dirs}


# --- predictions -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["fp32", "pruned", "quantized", "onnx_int8", "openvino_int8"])
def test_pyfunc_predicts_what_the_variant_predicts(
    variant, variant_dirs, loaded, packaged_tokenizer
):
    expected = in_process_logits(variant_dirs[variant], packaged_tokenizer, TEXTS).softmax(-1)
    predictions = loaded[variant].predict(TEXTS)
    assert [row["label"] for row in predictions] == [
        CLASSES[index] for index in expected.argmax(-1).tolist()
    ]
    scores = torch.tensor([row["score"] for row in predictions])
    torch.testing.assert_close(scores, expected.max(-1).values, atol=1e-5, rtol=0)
    assert not any(row["truncated"] for row in predictions)


def test_a_logged_temperature_divides_the_logits_before_the_softmax(
    experiment, variant_dirs, packaged_tokenizer
):
    """evaluate's temperature scaling, as the report registers it (model_config) and as
    `trimflow serve --variant` loads it."""
    logits = in_process_logits(variant_dirs["onnx_int8"], packaged_tokenizer, TEXTS)
    expected = (logits / 2.5).softmax(-1).max(-1).values
    with mlflow.start_run(experiment_id=experiment):
        uri = log_variant_model(variant_dirs["onnx_int8"], temperature=2.5).model_uri
    served = mlflow.pyfunc.load_model(uri).predict(TEXTS)
    local = VariantModel().load(variant_dirs["onnx_int8"], temperature=2.5).predict_texts(TEXTS)
    for rows in (served, local):
        scores = torch.tensor([row["score"] for row in rows])
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="temperature 0.0 is not positive"):
        VariantModel().load(variant_dirs["onnx_int8"], temperature=0.0)


def test_pruned_pyfunc_serves_the_pruned_architecture(loaded):
    served = loaded["pruned"].unwrap_python_model().model
    assert served.config.intermediate_sizes == [32, 64]
    assert served.bert.encoder.layer[1].attention.self.num_attention_heads == 2


def test_only_an_openvino_model_requires_openvino(logged):
    def requirements(name: str) -> str:
        return Path(mlflow.pyfunc.get_model_dependencies(logged[name])).read_text()

    assert "openvino==" in requirements("openvino_int8")
    assert "openvino" not in requirements("onnx_int8")


def test_variant_predictions_are_not_all_one_label(loaded):
    assert len({row["label"] for row in loaded["fp32"].predict(TEXTS)}) > 1


def test_dataframe_inputs_give_the_same_predictions(loaded):
    expected = loaded["fp32"].predict(TEXTS)
    assert loaded["fp32"].predict(pd.DataFrame({"text": TEXTS})) == expected
    assert loaded["fp32"].predict(pd.DataFrame({"body": TEXTS})) == expected


def test_texts_beyond_max_length_are_truncated_and_flagged(loaded):
    long_text = "wheat " * 400  # far more word pieces than the 128 positions
    short, long = loaded["fp32"].predict(["wheat", long_text])
    assert not short["truncated"] and long["truncated"]
    assert long["label"] in CLASSES


def test_ner_entities_are_spans_of_the_input(loaded, variant_dirs, packaged_tokenizer):
    texts = ["  Kuala   Lumpur  and\tWolfsburg signed", *TEXTS]
    predictions = loaded["ner"].predict(texts)
    model = load_variant(variant_dirs["ner"])
    found = 0
    for text, prediction in zip(texts, predictions, strict=True):
        words = text.split()
        encoded = packaged_tokenizer([words], is_split_into_words=True, return_tensors="pt")
        with torch.inference_mode():
            token_tags = model(**encoded).logits.argmax(-1)[0].tolist()
        tags = word_predictions(token_tags, encoded.word_ids(0), len(words), fill=0)
        tagged_words = {
            word for word, tag in zip(words, tags, strict=True) if TINY_TAGS[tag] != "O"
        }
        entity_words = set()
        for entity in prediction["entities"]:
            assert text[entity["start"] : entity["end"]] == entity["text"]
            assert entity["text"] == entity["text"].strip() and entity["type"] == "loc"
            assert 0.0 < entity["score"] <= 1.0
            entity_words.update(entity["text"].split())
            found += 1
        assert entity_words == tagged_words
    assert found > 0


def test_ner_truncation_leaves_the_cut_words_outside(loaded):
    text = " ".join(["Wolfsburg"] * 300)
    (prediction,) = loaded["ner"].predict([text])
    assert prediction["truncated"]
    tagged_words = 126  # at most: 128 positions less [CLS] and [SEP]
    assert all(
        entity["end"] <= tagged_words * len("Wolfsburg ") for entity in prediction["entities"]
    )


@pytest.mark.parametrize(
    ("bad_input", "message"),
    [
        (["fine", 3], "input[1] is a int, not a string"),
        (["fine", "ok", "   "], "input[2] is empty"),
        (["fine", "x" * 10_001], "input[1] has 10001 characters, more than max_chars=10000"),
        (pd.DataFrame({"text": ["fine", None]}), "input[1] is missing (null)"),
    ],
)
def test_bad_inputs_are_rejected_naming_the_item(loaded, bad_input, message):
    with pytest.raises(MlflowException, match=re.escape(message)) as raised:
        loaded["fp32"].predict(bad_input)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


def test_a_frame_without_a_text_column_is_rejected(loaded):
    frame = pd.DataFrame({"title": ["x"], "body": ["y"]})  # MLflow's checks keep one column
    with pytest.raises(MlflowException, match="expected a 'text' column or a single column"):
        loaded["fp32"].unwrap_python_model().predict(None, frame)


def test_an_empty_list_is_rejected(loaded):
    with pytest.raises(MlflowException) as raised:
        loaded["fp32"].predict([])  # MLflow's signature check rejects it before predict runs
    assert raised.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match="the input list is empty"):
        loaded["fp32"].unwrap_python_model().predict(None, [])


# --- registry ----------------------------------------------------------------------------------


def test_champion_moves_only_to_a_strictly_better_version(tracking_db, logged, tmp_path):
    client = MlflowClient(tracking_db)
    name = f"registry-{tmp_path.name}"

    def register(objective: float, variant: str):
        return register_recommended(
            client, logged["run_id"], logged["fp32"], name, objective, variant
        )

    first = register(0.80, "finetuned")
    assert (first.version, first.promoted, first.previous_champion) == (1, True, None)
    worse = register(0.75, "pruned")
    assert (worse.version, worse.promoted, worse.previous_champion) == (2, False, 1)
    assert int(client.get_model_version_by_alias(name, CHAMPION).version) == 1
    better = register(0.85, "distilled")
    assert (better.version, better.promoted, better.previous_champion) == (3, True, 1)
    tie = register(0.85, "quantized")
    assert (tie.version, tie.promoted, tie.previous_champion) == (4, False, 3)
    assert int(client.get_model_version_by_alias(name, CHAMPION).version) == 3
    expected = {"1": ("0.8", "finetuned"), "2": ("0.75", "pruned"), "3": ("0.85", "distilled")}
    for version, (objective, variant) in expected.items():
        tags = client.get_model_version(name, version).tags
        assert (tags[OBJECTIVE_TAG], tags[VARIANT_TAG]) == (objective, variant)
    assert client.get_model_version(name, "2").run_id == logged["run_id"]


def test_report_hook_logs_and_registers_the_recommended_variant(
    experiment, tracking_db, variant_dirs, tiny_config, tmp_path
):
    cfg = tiny_config()
    layout = dvc_layout(tmp_path)
    shutil.copytree(variant_dirs["onnx_int8"], layout.model_dir("onnx_int8"))
    metrics = {
        "metric": "accuracy",
        "recommended": "onnx_int8",
        "variants": {"finetuned": {"accuracy": 0.9}, "onnx_int8": {"accuracy": 0.875}},
    }
    with mlflow.start_run(experiment_id=experiment) as run:
        result = publish_recommended(cfg, layout, metrics, run.info.run_id)
    client = MlflowClient(tracking_db)
    version = client.get_model_version("trimflow-classification", str(result.version))
    assert version.tags == {OBJECTIVE_TAG: "0.875", VARIANT_TAG: "onnx_int8"}
    assert version.run_id == run.info.run_id
    model = mlflow.pyfunc.load_model(f"models:/trimflow-classification/{result.version}")
    assert model.model_config["max_length"] == cfg.model.max_length
    assert model.predict(TEXTS[:2])[0]["label"] in CLASSES


# --- the scoring server ------------------------------------------------------------------------


@pytest.mark.slow
def test_scoring_server_serves_the_champion(tmp_path, variant_dirs, packaged_tokenizer):
    fresh_store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking_to(fresh_store, tmp_path / "artifacts") as experiment:
        with mlflow.start_run(experiment_id=experiment) as run:
            info = log_variant_model(variant_dirs["fp32"], max_chars=SERVE_MAX_CHARS)
        registered = register_recommended(
            MlflowClient(fresh_store),
            run.info.run_id,
            info.model_uri,
            "trimflow-classification",
            0.9,
            "fp32",
        )
    assert registered.promoted
    expected = in_process_logits(variant_dirs["fp32"], packaged_tokenizer, TEXTS).argmax(-1)
    server = ScoringServer("models:/trimflow-classification@champion", fresh_store, tmp_path)
    with server:
        labels = [row["label"] for row in server.predict(TEXTS)]
        assert labels == [CLASSES[index] for index in expected.tolist()]
        frame = {"dataframe_split": {"columns": ["text"], "data": [[sample] for sample in TEXTS]}}
        status, text = server.post(json.dumps(frame).encode())
        assert status == 200 and [r["label"] for r in json.loads(text)["predictions"]] == labels
        status, text = server.post(b'{"inputs": ["unterminated')
        assert 400 <= status < 500 and json.loads(text)["message"]
        too_long = {"inputs": ["fine", "x" * (SERVE_MAX_CHARS + 1)]}
        status, text = server.post(json.dumps(too_long).encode())
        assert status == 400
        assert f"input[1] has {SERVE_MAX_CHARS + 1} characters" in json.loads(text)["message"]
        with pytest.raises(ServerError, match="answered 400"):
            server.predict(["fine", ""])
    assert server.process.poll() is not None


@pytest.mark.slow
def test_a_server_that_cannot_load_its_model_fails_with_its_stderr(tmp_path):
    fresh_store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = ScoringServer("models:/no-such-model@champion", fresh_store, tmp_path)
    with pytest.raises(ServerError, match=r"server exited with \d+:\n(.|\n)*no-such-model"):
        server.start()
    assert server.process.poll() is not None
