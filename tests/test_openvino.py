"""OpenVINO variants (openvino_fp32, openvino_int8) of a tiny BERT: built from the ONNX export,
loaded by `load_variant`, compared with torch, counted, and served through the pyfunc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version

import pytest
import torch
from families import batches_for, build_tiny, tiny_tokenizer
from helpers import (
    TINY_LABELS,
    TINY_TAGS,
    build_tiny_bert,
    build_tiny_tagger,
    logits,
    perturbed,
)

from trimflow.compress.onnx import OnnxClassifier, export_onnx
from trimflow.compress.openvino import (
    OPENVINO_QUANTIZERS,
    OpenVinoClassifier,
    compile_options,
    save_openvino,
)
from trimflow.compress.variants import (
    OPENVINO_FILE,
    OPENVINO_SCHEME_FILE,
    load_variant,
    save_onnx_variant,
    save_openvino_variant,
    variant_runtime,
)
from trimflow.config.loading import compose_config
from trimflow.evaluation.devices import cpu_reason
from trimflow.evaluation.footprint import count_parameters
from trimflow.models.loading import save_model_dir
from trimflow.serving.pyfunc import VariantModel, runtime_requirements

SCHEMES = tuple(OPENVINO_QUANTIZERS)
TEXTS = [
    "oil prices rose sharply on opec news",
    "the company reported higher quarterly earnings and raised its dividend for the year",
    "wheat exports fell",
    "central bank cuts interest rates again to support the currency",
    "Kuala Lumpur and Wolfsburg signed a trade deal",
    "shares of the acquired unit jumped",
    "grain shipments resumed after the strike at the port ended on monday",
    "profit",
]
# fp32: the same graph in float32 arithmetic; kernels sum in another order than torch's.
FP32_ATOL = 1e-4
# int8 against fp32 torch, largest logit error over the largest |logit|, and argmax agreement.
# The tiny BERT is random weights perturbed by N(0, 0.1-0.2): its activations have none of a
# trained model's structure and its logits sit close together (largest |logit| ~0.5 to 3.5),
# so a few texts or tokens sit near a decision boundary. Measured on an AVX2-only AMD EPYC:
# largest relative error 0.04 (classifier) and 0.07 (tagger), agreement 1.0 and 0.985.
INT8_RELATIVE_TOLERANCE = 0.15
INT8_AGREEMENT = 0.9


def encoded(tokenizer, texts: list[str], **options) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, return_tensors="pt", **options))


@pytest.fixture(scope="module")
def batches(packaged_tokenizer) -> list[dict[str, torch.Tensor]]:
    """Padded batches of 3 different lengths and sizes, and one text alone (batch 1)."""
    return [
        encoded(packaged_tokenizer, TEXTS[:4]),
        encoded(packaged_tokenizer, TEXTS[4:]),
        encoded(packaged_tokenizer, [" ".join(TEXTS)] * 2 + TEXTS[:3]),
        encoded(packaged_tokenizer, TEXTS[2:3]),
    ]


@pytest.fixture(scope="module")
def calibration(packaged_tokenizer) -> list[dict[str, torch.Tensor]]:
    """Two batches of other texts, as the quantize stage passes validation batches."""
    texts = [f"{text} in {city}" for text in TEXTS for city in ("tokyo", "paris")]
    return [encoded(packaged_tokenizer, texts[:8]), encoded(packaged_tokenizer, texts[8:])]


@pytest.fixture(scope="module")
def classifier():
    return perturbed(build_tiny_bert(), scale=0.1)


@pytest.fixture(scope="module")
def tagger():
    return perturbed(build_tiny_tagger(), scale=0.2)


def build_variants(model, labels, tokenizer, calibration, root) -> dict[str, object]:
    """The source directory and each OpenVINO scheme's variant of `model`, under `root`."""
    dirs = {"source": root / "source"}
    save_model_dir(model, tokenizer, {"labels": labels}, dirs["source"])
    for scheme in SCHEMES:
        dirs[scheme] = root / scheme
        dirs[scheme].mkdir()  # the quantize stage passes an atomic_dir
        save_openvino_variant(
            model, dirs["source"], dirs[scheme], scheme, calibration[0], calibration
        )
    return dirs


@pytest.fixture(scope="module")
def variant_dirs(classifier, packaged_tokenizer, calibration, tmp_path_factory):
    root = tmp_path_factory.mktemp("openvino")
    return build_variants(classifier, TINY_LABELS, packaged_tokenizer, calibration, root)


@pytest.fixture(scope="module")
def tagger_dirs(tagger, packaged_tokenizer, calibration, tmp_path_factory):
    root = tmp_path_factory.mktemp("openvino-ner")
    return build_variants(tagger, TINY_TAGS, packaged_tokenizer, calibration, root)


def relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    return float((found - expected).abs().max() / expected.abs().max())


def agreement(found: torch.Tensor, expected: torch.Tensor) -> float:
    return float((found.argmax(-1) == expected.argmax(-1)).float().mean())


def token_logits(model, batch) -> torch.Tensor:
    """The logits of the real tokens only: padding positions are no predictions."""
    return logits(model, batch)[batch["attention_mask"].bool()]


# --- building ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_variant_is_an_ir_with_its_source_metadata_and_a_record(scheme, variant_dirs):
    directory = variant_dirs[scheme]
    names = {path.name for path in directory.iterdir()}
    assert {OPENVINO_FILE, "model.bin", OPENVINO_SCHEME_FILE, "config.json"} <= names
    assert {"label_map.json", "tokenizer.json"} <= names
    assert not names & {"model.safetensors", "model.onnx"}  # no export left behind
    record = json.loads((directory / OPENVINO_SCHEME_FILE).read_text())
    calibrated = scheme == "openvino_int8"
    assert record["scheme"] == scheme
    assert record["calibration_batches"] == (2 if calibrated else 0)
    assert record["openvino"] == version("openvino")
    assert record["nncf"] == (version("nncf") if calibrated else None)
    assert (record["overflow_fix"] is None) == (not calibrated)


def test_int8_weights_take_about_a_quarter_of_the_fp32_ones(variant_dirs):
    # Embeddings included: NNCF's transformer preset quantizes the Gather tables too.
    fp32 = (variant_dirs["openvino_fp32"] / "model.bin").stat().st_size
    int8 = (variant_dirs["openvino_int8"] / "model.bin").stat().st_size
    assert 0.25 < int8 / fp32 < 0.32


def test_unknown_scheme_and_missing_calibration_are_refused(classifier, batches, tmp_path):
    with pytest.raises(ValueError, match="unknown OpenVINO scheme 'onnx_fp32'"):
        save_openvino(classifier, batches[0], tmp_path / "model.xml", "onnx_fp32", [])
    with pytest.raises(ValueError, match="calibration batch"):
        save_openvino(classifier, batches[0], tmp_path / "model.xml", "openvino_int8", [])


def test_variant_runtime_names_what_runs_each_format(variant_dirs, classifier, batches, tmp_path):
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    save_onnx_variant(classifier, variant_dirs["source"], onnx_dir, "onnx_fp32", batches[0], [])
    assert variant_runtime(variant_dirs["source"]) == "torch"
    assert variant_runtime(onnx_dir) == "onnxruntime"
    assert isinstance(load_variant(onnx_dir), OnnxClassifier)
    for scheme in SCHEMES:
        assert variant_runtime(variant_dirs[scheme]) == "openvino"
        assert isinstance(load_variant(variant_dirs[scheme]), OpenVinoClassifier)
    with pytest.raises(FileNotFoundError, match="not a model variant directory"):
        variant_runtime(tmp_path)


def test_zoo_declares_both_schemes_and_they_are_evaluated_on_the_cpu():
    cfg = compose_config(["experiment=zoo"])
    declared = {name: v.scheme for name, v in cfg.quantize.variants.items()}
    assert {declared["openvino"], declared["openvino_int8"]} == set(SCHEMES)
    for name in ("openvino", "openvino_int8"):
        assert "CPU only" in cpu_reason(cfg, name, "quantize")


# --- running -----------------------------------------------------------------------------------


def test_compiled_for_the_cpu_in_fp32_with_the_given_threads_and_dynamic_shapes(variant_dirs):
    model = load_variant(variant_dirs["openvino_fp32"], num_threads=2)
    assert set(compile_options(2)) == {
        "INFERENCE_NUM_THREADS",
        "PERFORMANCE_HINT",
        "INFERENCE_PRECISION_HINT",
    }
    assert model.compiled.get_property("INFERENCE_NUM_THREADS") == 2
    assert model.compiled.get_property("PERFORMANCE_HINT") == "LATENCY"
    f32 = compile_options(2)["INFERENCE_PRECISION_HINT"]  # openvino.Type.f32
    assert model.compiled.get_property("INFERENCE_PRECISION_HINT") == f32
    assert model.input_names == ["input_ids", "attention_mask", "token_type_ids"]
    for port in model.compiled.inputs:
        assert port.partial_shape.is_dynamic and port.partial_shape.rank.get_length() == 2
    assert model.eval() is model
    with pytest.raises(ValueError, match="run on the CPU"):
        load_variant(variant_dirs["openvino_fp32"], device="cuda")


def test_fp32_matches_torch_on_padded_batches_and_one_text(classifier, variant_dirs, batches):
    model = load_variant(variant_dirs["openvino_fp32"], num_threads=2)
    for batch in batches:
        found = model(**batch, labels=torch.zeros(len(batch["input_ids"]))).logits
        assert found.dtype == torch.float32 and found.shape == (len(batch["input_ids"]), 3)
        torch.testing.assert_close(found, logits(classifier, batch), atol=FP32_ATOL, rtol=0)


def test_int8_stays_close_to_torch_and_mostly_agrees(classifier, variant_dirs, batches):
    model = load_variant(variant_dirs["openvino_int8"], num_threads=2)
    found = [model(**batch).logits for batch in batches]
    expected = [logits(classifier, batch) for batch in batches]
    for got, reference in zip(found, expected, strict=True):
        assert torch.isfinite(got).all()
        assert relative_error(got, reference) < INT8_RELATIVE_TOLERANCE
    assert agreement(torch.cat(found), torch.cat(expected)) >= INT8_AGREEMENT
    assert not torch.equal(torch.cat(found), torch.cat(expected))  # it is quantized


def test_token_classifier_fp32_and_int8(tagger, tagger_dirs, batches):
    fp32 = load_variant(tagger_dirs["openvino_fp32"], num_threads=2)
    int8 = load_variant(tagger_dirs["openvino_int8"], num_threads=2)
    found, expected = [], []
    for batch in batches:
        shape = (*batch["input_ids"].shape, len(TINY_TAGS))
        assert logits(fp32, batch).shape == logits(int8, batch).shape == shape
        reference = token_logits(tagger, batch)
        torch.testing.assert_close(token_logits(fp32, batch), reference, atol=FP32_ATOL, rtol=0)
        found.append(token_logits(int8, batch))
        expected.append(reference)
        assert relative_error(found[-1], reference) < INT8_RELATIVE_TOLERANCE
    assert agreement(torch.cat(found), torch.cat(expected)) >= INT8_AGREEMENT


def test_parameter_counts_match_torch(classifier, variant_dirs):
    # The perturbed weights are all distinct tensors: the export keeps each (see test_onnx.py).
    total, nonzero = count_parameters(classifier)
    fp32 = load_variant(variant_dirs["openvino_fp32"])
    assert fp32.parameter_counts() == count_parameters(fp32) == (total, nonzero)
    int8_total, int8_nonzero = load_variant(variant_dirs["openvino_int8"]).parameter_counts()
    assert int8_total == total  # scales, zero points, ranges and SmoothQuant scales left out
    assert 0.9 * nonzero < int8_nonzero <= nonzero  # small weights may round to 0


def test_zeroed_weights_count_as_zeros(batches, tmp_path):
    model = perturbed(build_tiny_bert(), scale=0.1)
    with torch.no_grad():
        model.classifier.weight[0] = 0
        model.bert.encoder.layer[0].intermediate.dense.weight[:5] = 0
    total, nonzero = count_parameters(model)
    save_openvino(model, batches[0], tmp_path / "model.xml", "openvino_fp32", [])
    assert OpenVinoClassifier(tmp_path / "model.xml", 1).parameter_counts() == (total, nonzero)


@pytest.mark.parametrize("family", ["distilbert", "deberta-v2", "modernbert"])
def test_other_families_convert_like_torch(family, tmp_path):
    # DistilBERT takes no segment ids; DeBERTa's relative-position buckets and ModernBERT's
    # rotary angles and 16-token sliding window must stay shape-generic beyond the sample.
    tokenizer = tiny_tokenizer(family)
    model = perturbed(build_tiny(family, tokenizer=tokenizer), 0.1)
    sample, batch = batches_for(tokenizer)
    long = encoded(tokenizer, [" ".join(TEXTS), TEXTS[0]], truncation=True, max_length=120)
    assert long["input_ids"].shape[1] > 40
    save_openvino(model, sample, tmp_path / "model.xml", "openvino_fp32", [])
    converted = OpenVinoClassifier(tmp_path / "model.xml", 1)
    for inputs in (batch, long):
        torch.testing.assert_close(
            converted(**inputs).logits, logits(model, inputs), atol=FP32_ATOL, rtol=1e-4
        )


# --- serving -----------------------------------------------------------------------------------


def test_pyfunc_requirements_name_openvino_for_its_variants_only(variant_dirs):
    pinned = f"openvino=={version('openvino')}"
    assert pinned in runtime_requirements(variant_dirs["openvino_int8"])
    assert pinned not in runtime_requirements(variant_dirs["source"])
    assert not any(name.startswith("nncf") for name in runtime_requirements(variant_dirs["source"]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_served_by_the_pyfunc_as_loaded(scheme, variant_dirs, classifier, packaged_tokenizer):
    served = VariantModel().load(variant_dirs[scheme])
    assert isinstance(served.model, OpenVinoClassifier)
    rows = served.predict(None, TEXTS)
    model = load_variant(variant_dirs[scheme])
    expected = logits(model, encoded(packaged_tokenizer, TEXTS)).softmax(-1)
    assert [row["label"] for row in rows] == [TINY_LABELS[i] for i in expected.argmax(-1)]
    scores = torch.tensor([row["score"] for row in rows])
    torch.testing.assert_close(scores, expected.max(-1).values, atol=1e-5, rtol=0)


def test_ner_served_by_the_pyfunc(tagger_dirs):
    served = VariantModel().load(tagger_dirs["openvino_int8"])
    (row,) = served.predict(None, ["Kuala Lumpur and Wolfsburg signed a deal"])
    assert set(row) == {"entities", "truncated"}


# --- telemetry ---------------------------------------------------------------------------------


@pytest.mark.slow  # ~10 s: a fresh interpreter imports torch, transformers and nncf
def test_importing_and_converting_neither_phones_home_nor_prints(classifier, batches, tmp_path):
    """In a fresh process with an empty HOME: openvino-telemetry is never imported (it would
    write ~/intel/openvino_ga_cid and send events at import and conversion, each from a child
    process waited on for up to 3 s) and nothing is printed to stdout."""
    exported = tmp_path / "model.onnx"
    export_onnx(classifier, batches[0], exported)
    script = "\n".join(
        [
            "import sys",
            "from unittest.mock import MagicMock",
            "import trimflow.compress.openvino",
            "import nncf, openvino",
            "from nncf.telemetry import wrapper",
            "from openvino.tools.ovc import telemetry_utils",
            "assert sys.modules['openvino_telemetry'] is None",
            "assert telemetry_utils.tm.__name__.endswith('telemetry_stub')",
            "assert isinstance(wrapper.telemetry, MagicMock)  # NNCFTelemetryStub",
            f"openvino.convert_model({str(exported)!r})",
        ]
    )
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("PYTEST_CURRENT_TEST", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert not (tmp_path / "intel").exists()
