"""`model.truncation`: which tokens of a long text are kept (head, tail, head_tail), the same in
the tokenize stage and the served model, recorded with the data and every model directory."""

from __future__ import annotations

import datasets
import mlflow
import pandas as pd
import pytest
import torch
import yaml
from families import FAMILIES, build_tiny, tiny_tokenizer
from helpers import build_tiny_bert
from omegaconf import OmegaConf
from transformers import BertTokenizer

from trimflow.config.loading import (
    ConfigError,
    compose_config,
    compose_raw,
    conf_dir,
    load_params,
)
from trimflow.data.tokenization import tokenize_split
from trimflow.data.truncation import (
    TRUNCATIONS,
    head_tail_split,
    keep_pieces,
    recorded_truncation,
    truncate_texts,
)
from trimflow.layout import TOKENIZED_SPLITS, TOKENIZER, dvc_layout, read_label_map
from trimflow.models.loading import load_tokenizer, save_model_dir
from trimflow.serving.pyfunc import VariantModel, log_variant_model
from trimflow.stages import tokenize as tokenize_stage
from trimflow.utils.atomic import read_json, write_json

MODES = ("head", "tail", "head_tail")
WORDS = [f"w{i}" for i in range(100)]
LONG = " ".join(WORDS)  # 100 word pieces with the word tokenizer
SHORT = "w7 w3 w5"
LABELS = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def word_tokenizer():
    """A WordPiece tokenizer whose vocabulary is the words w0 ... w99: one piece per word."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizer(vocab={token: i for i, token in enumerate(specials + WORDS)})


def kept_words(tokenizer, ids: list[int]) -> list[str]:
    return tokenizer.convert_ids_to_tokens(ids)


# --- the split of the budget ---------------------------------------------------------------------


def test_head_tail_keeps_a_quarter_head_as_sun_et_al():
    assert head_tail_split(510) == (128, 382)  # Sun et al., 2019
    assert head_tail_split(126) == (32, 94)  # max_length 128 with [CLS] and [SEP]
    assert head_tail_split(254) == (64, 190)
    assert all(sum(head_tail_split(budget)) == budget for budget in range(1, 600))


def test_the_modes_are_the_schema_s():
    assert MODES == TRUNCATIONS


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("head", list(range(10))),
        ("tail", list(range(90, 100))),
        ("head_tail", [0, 1, 2, *range(93, 100)]),
    ],
)
def test_keep_pieces(mode, expected):
    assert keep_pieces(list(range(100)), 10, mode) == expected
    assert keep_pieces(list(range(10)), 10, mode) == list(range(10))


def test_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match="model.truncation"):
        keep_pieces(list(range(20)), 10, "middle")


# --- which tokens each mode keeps ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        ("head", WORDS[:10]),
        ("tail", WORDS[90:]),
        ("head_tail", WORDS[:3] + WORDS[93:]),  # budget 10: 3 head + 7 tail
    ],
)
def test_each_mode_keeps_its_words_between_the_special_tokens(word_tokenizer, mode, words):
    kept = truncate_texts(word_tokenizer, [LONG, SHORT], max_length=12, truncation=mode)
    long_ids, short_ids = kept.inputs["input_ids"]
    assert kept_words(word_tokenizer, long_ids) == ["[CLS]", *words, "[SEP]"]
    assert kept.inputs["token_type_ids"][0] == [0] * 12
    assert kept.inputs["attention_mask"][0] == [1] * 12
    assert kept_words(word_tokenizer, short_ids) == ["[CLS]", "w7", "w3", "w5", "[SEP]"]
    assert kept.truncated == [True, False]
    assert [len(encoding.ids) for encoding in kept.encodings] == [100, 3]  # the whole text


@pytest.mark.parametrize("mode", MODES)
def test_at_128_tokens(word_tokenizer, mode):
    text = " ".join(WORDS * 3)  # 300 pieces
    ids = truncate_texts(word_tokenizer, [text], 128, mode).inputs["input_ids"][0]
    words = kept_words(word_tokenizer, ids)
    assert len(ids) == 128 and words[0] == "[CLS]" and words[-1] == "[SEP]"
    expected = {
        "head": (WORDS * 3)[:126],
        "tail": (WORDS * 3)[-126:],
        "head_tail": (WORDS * 3)[:32] + (WORDS * 3)[-94:],
    }[mode]
    assert words[1:-1] == expected


def test_a_text_exactly_at_the_budget_is_not_truncated(word_tokenizer):
    for mode in MODES:
        kept = truncate_texts(word_tokenizer, [" ".join(WORDS[:10])], 12, mode)
        assert kept.truncated == [False]
        assert kept_words(word_tokenizer, kept.inputs["input_ids"][0])[1:-1] == WORDS[:10]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
def test_every_family_keeps_the_mode_s_pieces(family, mode):
    """WordPiece, byte-level BPE (RoBERTa, ModernBERT), Unigram (XLM-R, DeBERTa-v3)."""
    tokenizer = tiny_tokenizer(family)
    long_text = "the company reported higher quarterly earnings and a dividend " * 6
    short_text = "oil prices rose"
    max_length = 24
    kept = truncate_texts(tokenizer, [long_text, short_text], max_length, mode)
    pieces = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    whole = tokenizer([long_text, short_text])
    budget = max_length - tokenizer.num_special_tokens_to_add()
    head, tail = head_tail_split(budget)
    expected = {
        "head": pieces[:budget],
        "tail": pieces[-budget:],
        "head_tail": pieces[:head] + pieces[-tail:],
    }[mode]
    first, last = whole["input_ids"][0][0], whole["input_ids"][0][-1]  # <s> </s>, [CLS] [SEP]
    assert kept.inputs["input_ids"][0] == [first, *expected, last]
    assert list(kept.inputs) == list(whole)  # the tokenizer's own model inputs
    assert all(len(ids) <= max_length for ids in kept.inputs["input_ids"])
    # a short text is exactly what the tokenizer makes of it, in every mode
    assert {key: values[1] for key, values in kept.inputs.items()} == {
        key: values[1] for key, values in whole.items()
    }
    assert kept.truncated == [True, False]
    if mode == "head":  # head is the tokenizer's own truncation
        assert kept.inputs == dict(
            tokenizer([long_text, short_text], truncation=True, max_length=24)
        )


# --- the tokenize stage --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_tokenize_split_counts_and_keeps_what_the_mode_keeps(word_tokenizer, mode):
    data = datasets.Dataset.from_dict({"text": [LONG, SHORT, LONG], "label_id": [0, 1, 2]})
    tokenized, truncated = tokenize_split(data, word_tokenizer, 12, mode)
    assert truncated == 2
    assert tokenized["length"] == [12, 5, 12]
    expected = truncate_texts(word_tokenizer, [LONG, SHORT, LONG], 12, mode).inputs
    assert [list(ids) for ids in tokenized["input_ids"]] == expected["input_ids"]
    assert list(tokenized["labels"]) == [0, 1, 2]


def prepared_project(tmp_path, texts: list[str]):
    """data/prepared of a tiny classification dataset: every split the same `texts`."""
    layout = dvc_layout(tmp_path)
    layout.prepared.mkdir(parents=True)
    frame = pd.DataFrame({"text": texts, "label_id": [i % 3 for i in range(len(texts))]})
    for split in ("train", "validation", "test"):
        frame.to_parquet(layout.prepared / f"{split}.parquet", index=False)
    write_json(
        layout.prepared / "label_map.json",
        {"labels": LABELS, "dataset": "tiny", "dataset_digest": "0" * 16},
    )
    return layout


class Recording(torch.nn.Module):
    """A model that records the input ids it is given."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.input_ids: list[list[int]] = []

    def forward(self, **inputs):
        mask = inputs["attention_mask"].bool()
        self.input_ids += [
            ids[row].tolist() for ids, row in zip(inputs["input_ids"], mask, strict=True)
        ]
        return self.model(**inputs)


@pytest.mark.parametrize("mode", MODES)
def test_the_served_model_tokenizes_as_the_tokenize_stage_did(tmp_path, tiny_config, mode):
    texts = [
        " ".join(f"word{i % 23} number {i}" for i in range(80)),
        "oil prices rose sharply",
        "the end of a long text comes last " * 30,
    ]
    layout = prepared_project(tmp_path, texts)
    cfg = tiny_config(f"model.truncation={mode}", "tracking.enabled=false")
    tokenize_stage.run(cfg, layout)
    assert read_label_map(layout.tokenized)["truncation"] == mode
    stats = read_json(layout.tokenized / "tokenization.json")
    assert stats["truncation"] == mode and stats["splits"]["test"]["truncated"] == 2
    on_disk = datasets.load_from_disk(str(layout.tokenized / TOKENIZED_SPLITS))["test"]

    # as finetune saves a model directory: the tokenized data's tokenizer and label map
    variant_dir = layout.model_dir("finetuned")
    tokenizer = load_tokenizer(str(layout.tokenized / TOKENIZER))
    save_model_dir(build_tiny_bert(), tokenizer, read_label_map(layout.tokenized), variant_dir)
    model = VariantModel().load(variant_dir, max_length=cfg.model.max_length)
    assert model.truncation == mode
    model.model = Recording(model.model)
    rows, pieces = model.predict_with_pieces(texts, batch_size=2)
    assert model.model.input_ids == [list(ids) for ids in on_disk["input_ids"]]
    assert [row["truncated"] for row in rows] == [True, False, True]
    whole = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert [count["pieces"] for count in pieces] == [len(ids) for ids in whole]


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_the_served_model_keeps_the_tail_in_other_families(tmp_path, family):
    tokenizer = tiny_tokenizer(family)
    variant_dir = tmp_path / family
    label_map = {"labels": LABELS, "truncation": "head_tail"}
    save_model_dir(
        build_tiny(family, LABELS, tokenizer=tokenizer), tokenizer, label_map, variant_dir
    )
    text = "wheat exports fell as the harvest shrank " * 10 + "ship collision closes the port"
    model = VariantModel().load(variant_dir, max_length=32)
    model.model = Recording(model.model)
    assert model.predict_texts([text])[0]["truncated"]
    data = datasets.Dataset.from_dict({"text": [text], "label_id": [0]})
    tokenized, _ = tokenize_split(data, load_tokenizer(str(variant_dir)), 32, "head_tail")
    assert model.model.input_ids == [list(tokenized["input_ids"][0])]


def test_a_model_directory_without_a_recorded_mode_reads_as_head(tmp_path, word_tokenizer):
    save_model_dir(build_tiny_bert(), word_tokenizer, {"labels": LABELS}, tmp_path / "old")
    assert recorded_truncation(tmp_path / "old") == "head"
    assert VariantModel().load(tmp_path / "old", max_length=16).truncation == "head"


def test_the_logged_model_carries_the_mode(tmp_path, tracking_db, monkeypatch, word_tokenizer):
    variant_dir = tmp_path / "tail"
    save_model_dir(
        build_tiny_bert(), word_tokenizer, {"labels": LABELS, "truncation": "tail"}, variant_dir
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_db)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_db)
    try:
        experiment = mlflow.create_experiment(tmp_path.name, (tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            uri = log_variant_model(variant_dir, max_length=12).model_uri
        loaded = mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_tracking_uri(previous)
    assert loaded.model_config["truncation"] == "tail"
    assert loaded.unwrap_python_model().truncation == "tail"
    assert [row["truncated"] for row in loaded.predict([LONG, SHORT])] == [True, False]


# --- config --------------------------------------------------------------------------------------


def test_every_model_preset_declares_the_mode():
    presets = sorted(path.stem for path in (conf_dir() / "model").glob("*.yaml"))
    for preset in presets:
        assert compose_raw([f"model={preset}"]).model.truncation == "head_tail", preset
        assert compose_config([f"model={preset}", "task=ner"]).model.truncation == "head"
        tail = compose_config([f"model={preset}", "model.truncation=tail"])
        assert tail.model.truncation == "tail"


def test_params_written_before_the_key_read_as_head(tmp_path):
    raw = OmegaConf.to_container(compose_raw(), resolve=True)
    del raw["model"]["truncation"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert load_params(tmp_path / "params.yaml").model.truncation == "head"


def test_a_bad_mode_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.truncation"):
        compose_config(["model.truncation=middle"])


@pytest.mark.parametrize("mode", ["tail", "head_tail"])
def test_ner_refuses_all_but_head(mode):
    with pytest.raises(ConfigError, match=r"model\.truncation"):
        compose_config(["task=ner", f"model.truncation={mode}"])
    assert compose_config(["task=ner", "model.truncation=head"]).model.truncation == "head"


def test_a_token_model_refuses_all_but_head(tmp_path, packaged_tokenizer):
    from helpers import TINY_TAGS, build_tiny_tagger

    variant_dir = tmp_path / "ner"
    save_model_dir(
        build_tiny_tagger(),
        packaged_tokenizer,
        {"labels": TINY_TAGS, "truncation": "tail"},
        variant_dir,
    )
    with pytest.raises(ValueError, match="NER keeps the head"):
        VariantModel().load(variant_dir, max_length=16)
