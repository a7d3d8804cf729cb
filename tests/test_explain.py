"""Explanations: integrated gradients and feature ablation on tiny variants (a torch BERT and
its ONNX Runtime int8 export), `trimflow explain` and its errors, the agreement of two
attributions, and `POST /explain` of a real `trimflow serve`."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from helpers import TINY_LABELS, TINY_TAGS, build_tiny_bert, build_tiny_tagger, perturbed
from test_service import TOKEN, TOKEN_ENV, call, predict

from trimflow.cli import main
from trimflow.compress.variants import save_onnx_variant
from trimflow.config.loading import write_params
from trimflow.explain.agreement import attribution_agreement
from trimflow.explain.attribution import (
    ExplainError,
    ablation_word_attributions,
    encode_texts,
    explain_texts,
    explanation_method,
    integrated_gradients,
    scales_per_batch,
)
from trimflow.explain.render import JSON_FILE, PAGE_FILE
from trimflow.models.loading import save_model_dir
from trimflow.serving.pyfunc import VariantModel
from trimflow.serving.server import TrimflowServer

TEXTS = ["Oil prices rose sharply on OPEC news, traders said.", "wheat exports fell"]
LONG_TEXT = " ".join(["wheat"] * 300)  # a piece a word, far over the 128 positions
VARIANTS = ("tiny", "tiny_onnx_int8", "tagger")


@pytest.fixture(scope="module")
def project(tmp_path_factory, packaged_tokenizer):
    """A project folder: params.yaml and models/ with a tiny BERT classifier, its ONNX Runtime
    dynamic int8 export, and a tiny NER tagger."""
    root = tmp_path_factory.mktemp("explain-project")
    models = root / "models"
    model = perturbed(build_tiny_bert(), scale=0.5)
    save_model_dir(model, packaged_tokenizer, {"labels": TINY_LABELS}, models / "tiny")
    sample = dict(packaged_tokenizer(TEXTS, padding=True, return_tensors="pt"))
    (models / "tiny_onnx_int8").mkdir()
    save_onnx_variant(
        model, models / "tiny", models / "tiny_onnx_int8", "onnx_dynamic_int8", sample, []
    )
    tagger = perturbed(build_tiny_tagger(), scale=0.2)
    save_model_dir(tagger, packaged_tokenizer, {"labels": TINY_TAGS}, models / "tagger")
    write_params([], root / "params.yaml")
    return root


@pytest.fixture(scope="module")
def loaded(project) -> dict[str, VariantModel]:
    """Each variant of the project loaded as `trimflow serve --variant` loads it."""
    return {name: VariantModel().load(project / "models" / name) for name in VARIANTS}


def label_logit(model: VariantModel, inputs: dict[str, torch.Tensor], label: int) -> float:
    """The logit of `label` for one row of model inputs."""
    with torch.inference_mode():
        return float(model.model(**inputs).logits[0, label])


def predicted_label(model: VariantModel, text: str) -> int:
    """The index of the label the model predicts for `text`."""
    return model.labels.index(model.predict_texts([text])[0]["label"])


# --- the methods -------------------------------------------------------------------------------


def test_integrated_gradients_add_up_to_the_logit_change_from_the_baseline(loaded):
    model = loaded["tiny"]
    (text,) = encode_texts(model, TEXTS[:1])
    label = predicted_label(model, TEXTS[0])

    words, delta = integrated_gradients(model, text, label)

    pad = torch.full_like(text.piece_ids(), model.tokenizer.pad_token_id)
    change = label_logit(model, text.inputs, label) - label_logit(
        model, text.with_pieces(pad), label
    )
    # Completeness: the words (special tokens never move) carry the whole change, up to the
    # convergence delta captum states for the path integral.
    assert words.sum() - change == pytest.approx(delta, abs=1e-5)
    assert abs(delta) < 0.02 * abs(change)
    assert len(words) == len(TEXTS[0].split())


@pytest.mark.parametrize("variant", ["tiny", "tiny_onnx_int8"])
def test_ablating_a_word_drops_the_logit_by_its_attribution(loaded, variant):
    model = loaded[variant]
    (text,) = encode_texts(model, TEXTS[:1])

    (words,) = ablation_word_attributions(model, TEXTS[:1])

    assert [TEXTS[0][start:end] for start, end in text.spans] == TEXTS[0].split()
    assert len(words) == len(text.spans)
    label = predicted_label(model, TEXTS[0])
    for word in (int(np.abs(words).argmax()), len(words) - 1):  # the top one, the last one
        ablated = text.piece_ids().clone()
        ablated[0, text.piece_words == word] = model.tokenizer.pad_token_id
        drop = label_logit(model, text.inputs, label) - label_logit(
            model, text.with_pieces(ablated), label
        )
        assert drop == pytest.approx(words[word], abs=1e-5)


def test_words_are_those_the_served_truncation_keeps(project):
    model = VariantModel().load(project / "models/tiny", truncation="head_tail")
    (explanation,) = explain_texts(model, [LONG_TEXT], "ablation")

    # 126 pieces between [CLS] and [SEP]: 32 from the head, 94 from the tail.
    spans = [match.span() for match in re.finditer(r"\S+", LONG_TEXT)]
    assert [(word["start"], word["end"]) for word in explanation["words"]] == [
        *spans[:32],
        *spans[-94:],
    ]
    assert explanation["truncated"]


def test_only_dynamic_int8_scales_activations_per_batch(loaded):
    assert scales_per_batch(loaded["tiny_onnx_int8"].model)
    assert not scales_per_batch(loaded["tiny"].model)


def test_auto_picks_gradients_where_they_run_and_refuses_what_it_cannot_explain(loaded):
    assert explanation_method(loaded["tiny"], "auto") == "ig"
    assert explanation_method(loaded["tiny_onnx_int8"], "auto") == "ablation"
    with pytest.raises(ExplainError, match="integrated gradients need a torch variant"):
        explanation_method(loaded["tiny_onnx_int8"], "ig")
    with pytest.raises(ExplainError, match="NER explanations are not supported yet"):
        explanation_method(loaded["tagger"], "auto")


# --- agreement ---------------------------------------------------------------------------------


def test_agreement_of_identical_reversed_and_short_attributions():
    first = np.array([0.9, -0.8, 0.1, 0.05, 0.3, 0.0, -0.2])
    assert attribution_agreement([first], [first.copy()]) == {
        "attribution_topk_overlap": 1.0,
        "attribution_rank_correlation": 1.0,
    }
    reversed_ranks = attribution_agreement([np.arange(6.0)], [-np.arange(6.0)], k=2)
    assert reversed_ranks["attribution_rank_correlation"] == pytest.approx(-1.0)
    # Top-2 by absolute value: {5, 4} and {5, 4} (|-5| and |-4|).
    assert reversed_ranks["attribution_topk_overlap"] == 1.0
    # k is capped at the 2 words; a constant side leaves the correlation undefined.
    short = attribution_agreement(
        [np.array([1.0, 2.0]), np.ones(3)], [np.array([2.0, 1.0]), np.array([3.0, 2.0, 1.0])]
    )
    assert short == pytest.approx(
        {"attribution_topk_overlap": 1.0, "attribution_rank_correlation": -1.0}
    )


def test_agreement_needs_the_same_words():
    with pytest.raises(ValueError, match="text 0"):
        attribution_agreement([np.ones(3)], [np.ones(4)])
    with pytest.raises(ValueError, match="need as many"):
        attribution_agreement([np.ones(3)], [])


# --- trimflow explain --------------------------------------------------------------------------


def test_explain_writes_json_and_a_self_contained_page(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project)
    texts = tmp_path / "texts.txt"
    texts.write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\n")
    out = tmp_path / "out"

    status = main(["explain", "--variant", "tiny_onnx_int8", "--input", str(texts)])
    assert status == 0
    status = main(["explain", "--variant", "tiny", "--text", "<b>oil</b> & gas", "--out", str(out)])
    assert status == 0

    written = json.loads((project / "reports/explain" / JSON_FILE).read_text())
    assert written["variant"] == "tiny_onnx_int8"
    assert [row["text"] for row in written["explanations"]] == TEXTS
    row = written["explanations"][0]
    assert row["method"] == "ablation" and row["label"] in TINY_LABELS
    assert 0 < row["score"] <= 1 and row["cost_ms"] > 0
    assert [(word["word"], word["start"], word["end"]) for word in row["words"]] == [
        (match.group(), match.start(), match.end()) for match in re.finditer(r"\S+", TEXTS[0])
    ]
    (escaped,) = json.loads((out / JSON_FILE).read_text())["explanations"]
    assert escaped["method"] == "ig" and escaped["convergence_delta"] is not None
    page = (out / PAGE_FILE).read_text()
    assert "&lt;b&gt;oil&lt;/b&gt;" in page and "<b>" not in page
    assert escaped["label"] in page and "supports the label" in page
    assert not re.search(r"(src|href)=|https?://|@import|url\(", page)  # nothing fetched


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--variant", "missing", "--text", "oil"], "models/missing: no such variant"),
        (["--variant", "tiny", "--text", "  "], "--text: input[0] is empty"),
        (["--variant", "tiny", "--input", "absent.txt"], "absent.txt: cannot read it"),
        (["--variant", "tiny", "--input", "latin1.txt"], "latin1.txt: cannot read it as UTF-8"),
        (["--variant", "tiny", "--input", "blank.txt"], "blank.txt: holds no text"),
        (["--variant", "tagger", "--text", "oil"], "tagger: NER explanations are not supported"),
        (
            ["--variant", "tiny_onnx_int8", "--method", "ig", "--text", "oil"],
            "integrated gradients need a torch variant",
        ),
    ],
)
def test_explain_refuses_bad_input_with_2_writing_nothing(
    project, tmp_path, monkeypatch, caplog, arguments, message
):
    monkeypatch.chdir(project)
    (project / "latin1.txt").write_bytes("prix du pétrole\n".encode("latin-1"))
    (project / "blank.txt").write_text("\n  \n")
    out = tmp_path / "out"

    assert main(["explain", *arguments, "--out", str(out)]) == 2
    assert message in caplog.text
    assert not out.exists()


# --- POST /explain -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(project):
    """`trimflow serve --variant tiny`, ready."""
    with TrimflowServer(project, ["--variant", "tiny"], TOKEN_ENV) as running:
        running.wait_until_ready(TOKEN)
        yield running
    assert running.process.returncode == 0, running.stderr_tail()


def test_explain_route_needs_the_token(server):
    body = json.dumps({"text": TEXTS[0]}).encode()
    status, headers, answer = call(server.url, "/explain", body, token=None)
    assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")
    assert answer["error_code"] == "UNAUTHORIZED"


def test_explain_route_answers_as_the_command_explains(server, loaded):
    body = json.dumps({"texts": TEXTS}).encode()
    status, _, answer = call(server.url, "/explain", body)
    assert status == 200, answer
    expected = explain_texts(loaded["tiny"], TEXTS, "ablation")
    for served, local in zip(answer["explanations"], expected, strict=True):
        assert served["method"] == "ablation" and served["label"] == local["label"]
        assert [word["word"] for word in served["words"]] == [
            word["word"] for word in local["words"]
        ]
        served_values = [word["attribution"] for word in served["words"]]
        assert served_values == pytest.approx([word["attribution"] for word in local["words"]])

    status, _, answer = call(
        server.url, "/explain", json.dumps({"text": TEXTS[1], "method": "ig"}).encode()
    )
    assert status == 200, answer
    assert answer["explanations"][0]["method"] == "ig"


def test_predictions_pass_by_the_hooks_of_integrated_gradients_unchanged(server, loaded):
    expected = loaded["tiny"].predict_texts(TEXTS)
    body = json.dumps({"texts": [LONG_TEXT] * 2, "method": "ig"}).encode()
    with ThreadPoolExecutor(1) as pool:
        explaining = pool.submit(call, server.url, "/explain", body)
        answers = []
        while not explaining.done():
            answers.append(predict(server.url, TEXTS))
    assert explaining.result()[0] == 200
    assert answers
    for rows in answers:
        assert [row["label"] for row in rows] == [row["label"] for row in expected]
        assert [row["score"] for row in rows] == pytest.approx([row["score"] for row in expected])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"inputs": ["oil"]}, 'expected a JSON object with "text"'),
        ({"text": "  "}, "input[0] is empty"),
        ({"texts": ["oil"], "method": "shap"}, "method 'shap' is not one of"),
        ({"texts": ["oil"] * 33}, "33 texts to explain, more than serve.max_batch=32"),
    ],
)
def test_explain_route_answers_400_naming_the_problem(server, body, message):
    status, _, answer = call(server.url, "/explain", json.dumps(body).encode())
    assert status == 400 and message in answer["message"]
