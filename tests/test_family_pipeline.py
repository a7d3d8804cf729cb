"""The smoke DAG end to end on a tiny random encoder of every supported family: every variant
kind is built, evaluated and reported, and pruning and distillation shrink every family."""

from __future__ import annotations

import json

import pytest
from families import FAMILIES, save_tiny_encoder
from transformers import AutoTokenizer

from trimflow.compress.variants import load_variant
from trimflow.config.loading import compose_config
from trimflow.layout import dvc_layout, read_label_map
from trimflow.pipeline import run_pipeline
from trimflow.serving.pyfunc import VariantModel

pytestmark = pytest.mark.slow

# Four layers, so that the default student (half the teacher's depth) keeps two.
SHAPE = dict(layers=4, hidden=64, heads=4, ffn=256)
# Every adapt method, both pruning methods (structured on the fine-tuned model and on the
# student), the student, torch and ONNX int8 of each trained kind; the schemes that read no
# family-specific layout (half precision, int8 embeddings, the other ONNX forms, OpenVINO) run
# on the tiny BERT in tests/test_pipeline.py.
LEAN = (
    "~distill.students.distilled_third",
    *(
        f"~quantize.variants.{name}"
        for name in (
            "quantized_emb",
            "bf16",
            "fp16",
            "onnx",
            "onnx_static_int8",
            "openvino",
            "openvino_int8",
            "distilled_pruned_onnx_int8",
        )
    ),
)
# Encoders whose attention takes no past keys and values: prefix tuning is refused on them.
WITHOUT_KEY_VALUE_CACHE = {"distilbert", "deberta-v2", "modernbert"}


def smoke_run(family: str, root, tracking_db: str, *overrides: str):
    """The smoke pipeline in process on the family's tiny encoder in `root`: config and layout."""
    encoder = save_tiny_encoder(family, root / "encoder", **SHAPE)
    cfg = compose_config(
        [
            "experiment=smoke",
            f"model.name={encoder}",
            f"tracking.uri={tracking_db}",
            f"tracking.experiment={root.name}",
            "dataset.max_train_samples=120",
            "dataset.max_test_samples=40",
            *overrides,
        ]
    )
    layout = dvc_layout(root)
    run_pipeline(cfg, layout)
    return cfg, layout


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tmp_path_factory, tracking_db):
    """The smoke pipeline, in process, on the family's tiny encoder."""
    family = request.param
    cfg, layout = smoke_run(
        family,
        tmp_path_factory.mktemp(f"pipeline-{family}"),
        tracking_db,
        *LEAN,
        *(["~adapt.variants.prefix"] if family in WITHOUT_KEY_VALUE_CACHE else []),
    )
    return family, cfg, layout, json.loads(layout.metrics_file.read_text())


def test_every_variant_kind_is_built_and_evaluated(family_run):
    _, cfg, layout, metrics = family_run
    assert list(metrics["variants"]) == list(cfg.variant_kinds())
    for name, values in metrics["variants"].items():
        assert 0.0 <= values["accuracy"] <= 1.0, name
        assert values["latency_ms_p50"] > 0, name
    assert layout.report_file.is_file()


def test_pruned_and_distilled_are_smaller_than_the_fine_tuned_model(family_run):
    _, _, _, metrics = family_run
    variants = metrics["variants"]
    finetuned = variants["finetuned"]
    for name in ("pruned", "distilled"):
        assert variants[name]["params"] < finetuned["params"], name
        assert variants[name]["size_mb"] < finetuned["size_mb"], name
    assert variants["distilled_pruned"]["params"] < variants["distilled"]["params"]


def test_pruned_and_distilled_variants_reload_and_serve(family_run):
    family, _, layout, _ = family_run
    texts = ["oil prices rose sharply", "the bank cut rates"]
    labels = read_label_map(layout.finetuned)["labels"]
    for name in ("pruned", "distilled", "distilled_onnx_int8"):
        load_variant(layout.model_dir(name))
        served = VariantModel().load(layout.model_dir(name)).predict_texts(texts)
        assert [row["label"] in labels for row in served] == [True, True], (family, name)


# NER on each family's tokenizer: the trained kinds and their ONNX int8 forms.
NER_VARIANTS = ("finetuned", "lora", "distilled", "pruned", "onnx_int8", "distilled_onnx_int8")


@pytest.fixture(scope="module", params=FAMILIES)
def family_ner_run(request, tmp_path_factory, tracking_db):
    """The smoke pipeline with task=ner and the NER_VARIANTS only, in process."""
    family = request.param
    _, layout = smoke_run(
        family,
        tmp_path_factory.mktemp(f"ner-{family}"),
        tracking_db,
        "task=ner",
        "~adapt.variants",
        "+adapt.variants={lora:{method:lora,r:4,alpha:8,dropout:0.0,target_modules:null}}",
        "~prune.variants.sparse80",
        "~prune.variants.distilled_pruned",
        "~distill.students.distilled_third",
        "~quantize.variants",
        "+quantize.variants={onnx_int8:{source:finetuned,scheme:onnx_dynamic_int8},"
        "distilled_onnx_int8:{source:distilled,scheme:onnx_dynamic_int8}}",
    )
    return family, layout, json.loads(layout.metrics_file.read_text())


def test_ner_runs_every_trained_kind_on_the_family_tokenizer(family_ner_run):
    family, layout, metrics = family_ner_run
    assert tuple(metrics["variants"]) == NER_VARIANTS
    for name, values in metrics["variants"].items():
        assert 0.0 <= values["token_accuracy"] <= 1.0, (family, name)
        # beyond accuracy at word level: calibration, robustness in entity F1, word slices
        for key in ("ece", "ece_calibrated", "sample_f1", "f1_typo1", "worst_slice_accuracy"):
            assert 0.0 <= values[key] <= 1.0, (family, name, key)
        assert 0.0 <= values["invariance_failure_word_drop"] <= 1.0, (family, name)
    assert metrics["variants"]["finetuned"]["probability_loyalty"] == 1.0
    words = ["Watching", "the", "game", "at", "Madison", "Square", "Garden"]
    tokenizer = AutoTokenizer.from_pretrained(layout.tokenizer_dir)
    pieces = tokenizer(words, is_split_into_words=True).word_ids()
    assert sorted({word for word in pieces if word is not None}) == list(range(len(words)))
    served = (
        VariantModel()
        .load(layout.model_dir("distilled_onnx_int8"))
        .predict_texts([" ".join(words)])
    )
    assert "entities" in served[0], family
