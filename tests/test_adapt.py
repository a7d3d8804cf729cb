"""Parameter-efficient adaptation (LoRA, AdaLoRA, IA3, prefix tuning, BitFit, bottleneck
adapters) on a tiny BERT (every other family: test_family_adapters.py).

Every method on a sequence and a token classifier: which weights training touches, how many
train, the saved adapter and merged model reloading to the trained logits, the merged model
quantized like any variant, AdaLoRA's rank budget, config errors, and the `adapt` stage itself
(end to end for NER, and resumed after a SIGKILL).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from helpers import TINY_LABELS, build_tiny_bert, logits, quiet_trainer
from peft import PeftModel
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import BertModel, PreTrainedModel

from trimflow.compress.onnx import OnnxClassifier
from trimflow.compress.quantize import quantize_model, save_quantized, scheme_of
from trimflow.compress.variants import load_variant, save_onnx_variant
from trimflow.config.loading import ConfigError, compose_config
from trimflow.config.schema import MERGEABLE_METHODS
from trimflow.data.token_labels import IGNORE_INDEX
from trimflow.evaluation.footprint import count_trainable
from trimflow.evaluation.inference import model_inputs
from trimflow.evaluation.merging import merge_agreement
from trimflow.layout import ADAPTATION_FILE, ADAPTER_DIR, dvc_layout, read_label_map
from trimflow.models.adapter_training import AdaLoraBudget, orthogonality_penalty
from trimflow.models.adapters import (
    adapt_model,
    load_unmerged,
    save_adapted,
)
from trimflow.models.loading import load_base_classifier, load_classifier
from trimflow.models.module import ClassifierModule
from trimflow.models.recipe import build_datamodule
from trimflow.models.training import LAST_CHECKPOINT, fit_resumable
from trimflow.stages import adapt, prepare, tokenize

METHODS = ("lora", "adalora", "ia3", "prefix", "bitfit", "bottleneck")
TASKS = ("classification", "ner")
LABELS = {"classification": TINY_LABELS, "ner": ["O", "B-loc", "I-loc", "B-per", "I-per"]}
TEXTS = [
    "oil prices rose sharply on opec news",
    "the company reported higher quarterly earnings",
    "wheat exports fell",
    "central bank cuts interest rates again to support the currency",
    "Angela Merkel visited Paris and Kuala Lumpur",
    "Schwarzenegger met Merkel in Wolfsburg yesterday",
    "shares of the bank fell after the report",
    "exports of grain rose",
]
# A prefix-tuned NER variant is written with the encoder's config (architectures: BertModel),
# and load_unmerged picks the task from that config: it rebuilds a sequence classifier.


def cases(methods=METHODS):
    """(task, method) parameters."""
    return [
        pytest.param(task, method, id=f"{task}-{method}") for task in TASKS for method in methods
    ]


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo():
    """The zoo preset, which declares every adaptation method."""
    return compose_config(["experiment=zoo", "tracking.enabled=false"])


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, packaged_tokenizer):
    """A tiny 'pretrained' encoder (no head) whose weights were perturbed as if pretrained, so
    that biases are non-zero and LayerNorms not all ones."""
    path = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    encoder = BertModel(build_tiny_bert().config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    encoder.save_pretrained(path)
    packaged_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batches(packaged_tokenizer):
    """task -> two labelled batches of four texts: a label per text, or per word piece."""
    encoded = packaged_tokenizer(TEXTS, padding=True, return_tensors="pt")
    inputs = [{key: value[i : i + 4] for key, value in encoded.items()} for i in (0, 4)]
    per_text = [{**batch, "labels": torch.tensor([0, 1, 2, 0])} for batch in inputs]
    per_token = []
    for batch in inputs:
        ids = batch["input_ids"]
        special = (batch["attention_mask"] == 0) | (ids == packaged_tokenizer.cls_token_id)
        special |= ids == packaged_tokenizer.sep_token_id
        tags = (ids % len(LABELS["ner"])).masked_fill(special, IGNORE_INDEX)
        per_token.append({**batch, "labels": tags})
    return {"classification": per_text, "ner": per_token}


def base_classifier(encoder_dir, task: str) -> PreTrainedModel:
    """The encoder with a fresh head for the task, as the adapt stage loads it."""
    torch.manual_seed(0)
    return load_base_classifier(str(encoder_dir), LABELS[task], task)


def train_steps(model, batches, steps: int = 4, lr: float = 1e-2):
    """A few AdamW steps (no weight decay: only weights with a gradient move) on `batches`."""
    torch.manual_seed(0)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def snapshot(named) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in named}


def changed(before: dict, after: dict) -> set[str]:
    """Names whose tensors differ (both state dicts must have the same names)."""
    assert before.keys() == after.keys()
    return {name for name in before if not torch.equal(before[name], after[name])}


def unwrapped_weights(model, method: str) -> dict[str, torch.Tensor]:
    """The adapted model's weights in the base model's names, adapters left out: the head is
    the trained copy peft keeps in `modules_to_save`."""
    if method == "bitfit":
        return snapshot(model.state_dict().items())
    if method == "bottleneck":  # each adapted projection is `<path>.projection` beside `.adapter`
        return {
            name.replace(".projection.", "."): tensor.clone()
            for name, tensor in model.state_dict().items()
            if ".adapter." not in name
        }
    if method == "prefix":
        state = model.get_base_model().state_dict()
        return {
            name.replace("modules_to_save.default.", ""): tensor.clone()
            for name, tensor in state.items()
            if "original_module" not in name
        }
    return snapshot(copy.deepcopy(model).unload().state_dict().items())


def merged_changes(method: str, name: str) -> bool:
    """Whether merging `method`'s adapter (trained with the zoo/default targets) into the
    base model changes weight `name` (besides the head)."""
    if method in ("lora", "adalora"):  # B·A added to the query and value matrices
        return name.endswith(("self.query.weight", "self.value.weight"))
    if method == "ia3":  # key/value rows and biases scaled; `*output.dense` scales inputs
        return name.endswith(("key.weight", "key.bias", "value.weight", "value.bias")) or (
            name.endswith("output.dense.weight")
        )
    return name.endswith(".bias") or "LayerNorm" in name  # bitfit


def is_head(name: str) -> bool:
    return name.startswith("classifier.")


@pytest.fixture(scope="module")
def adapted(zoo, encoder_dir, batches, packaged_tokenizer, tmp_path_factory):
    """(task, method) -> (variant dir, logits of the trained model in memory per batch): each
    trained a few steps and written by save_adapted, once per module."""
    done = {}

    def make(task: str, method: str):
        if (task, method) not in done:
            spec = zoo.adapt.variants[method]
            model = adapt_model(
                base_classifier(encoder_dir, task), spec, f"adapt.variants.{method}"
            )
            train_steps(model, batches[task])
            expected = [logits(model, batch) for batch in batches[task]]
            out = tmp_path_factory.mktemp(f"{task}-{method}")
            label_map = {"labels": LABELS[task], "dataset_digest": "test"}
            save_adapted(model, spec, str(encoder_dir), packaged_tokenizer, label_map, out)
            done[task, method] = out, expected
        return done[task, method]

    return make


# --- what trains ------------------------------------------------------------------------------


@pytest.mark.parametrize(("task", "method"), cases())
def test_training_changes_only_the_methods_weights(task, method, zoo, encoder_dir, batches):
    """Base weights stay bit-identical; only adapter weights and the head copy train, and the
    merged model differs from the base exactly where the method's update lands."""
    base = base_classifier(encoder_dir, task)
    original = snapshot(base.state_dict().items())
    model = adapt_model(base, zoo.adapt.variants[method], f"adapt.variants.{method}")
    trainable_before = snapshot((n, p) for n, p in model.named_parameters() if p.requires_grad)

    train_steps(model, batches[task])

    trainable_after = snapshot((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert changed(trainable_before, trainable_after) == set(trainable_before)
    unwrapped = changed(original, unwrapped_weights(model, method))
    if method == "bitfit":
        assert unwrapped == {n for n in original if is_head(n) or merged_changes(method, n)}
    else:
        assert unwrapped == {name for name in original if is_head(name)}
    if method == "prefix":
        assert all(
            name.startswith(("prompt_encoder.", "base_model.classifier.modules_to_save"))
            for name in trainable_before
        )
    elif method == "bottleneck":
        assert all(".adapter." in name or is_head(name) for name in trainable_before)
    else:
        merged = (
            copy.deepcopy(model) if method == "bitfit" else copy.deepcopy(model).merge_and_unload()
        )
        expected = {n for n in original if is_head(n) or merged_changes(method, n)}
        assert changed(original, snapshot(merged.state_dict().items())) == expected


@pytest.mark.parametrize(("task", "method"), cases())
def test_trainable_count_follows_from_the_architecture(task, method, zoo, encoder_dir):
    base = base_classifier(encoder_dir, task)
    config, spec = base.config, zoo.adapt.variants[method]
    hidden, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head = hidden * config.num_labels + config.num_labels
    predicted = {
        # r·(in + out) per targeted linear: query and value in every layer.
        "lora": lambda: 2 * layers * spec.r * (hidden + hidden),
        # The same at init_r, plus init_r singular values.
        "adalora": lambda: 2 * layers * spec.init_r * (hidden + hidden + 1),
        # key, value: a vector per output; attention.output.dense and output.dense match the
        # feedforward suffix `output.dense`: a vector per input (hidden and intermediate).
        "ia3": lambda: layers * (hidden + hidden + hidden + ffn),
        # A key and a value vector per virtual token and layer.
        "prefix": lambda: spec.num_virtual_tokens * layers * 2 * hidden,
        # Down- and up-projection (weights and biases) after attention and FFN in every layer.
        "bottleneck": lambda: 2 * layers * (2 * hidden * spec.size + spec.size + hidden),
        # Embedding LayerNorm; per layer q, k, v, attention-out, intermediate and output biases
        # and two LayerNorms; the pooler's bias (sequence classifiers only).
        "bitfit": lambda: (
            2 * hidden
            + layers * (4 * hidden + ffn + hidden + 2 * 2 * hidden)
            + (hidden if task == "classification" else 0)
        ),
    }[method]()

    trainable, total = count_trainable(adapt_model(base, spec, f"adapt.variants.{method}"))

    assert trainable == predicted + head
    assert total >= sum(p.numel() for p in base_classifier(encoder_dir, task).parameters())


# --- saved variants ---------------------------------------------------------------------------


def inner(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


@pytest.mark.parametrize(("task", "method"), cases())
def test_saved_variant_reloads_to_the_trained_logits(task, method, adapted, batches, encoder_dir):
    """load_unmerged rebuilds base + adapter; load_variant reads the merged model where the
    method merges, else base + adapter; both compute what the trained model did."""
    out, expected = adapted(task, method)
    adaptation = json.loads((out / ADAPTATION_FILE).read_text())
    assert adaptation["method"] == method and adaptation["base_model"] == str(encoder_dir)
    assert adaptation["merged"] == (method in MERGEABLE_METHODS)
    unmerged, variant = load_unmerged(out), load_variant(out)
    assert isinstance(variant, PeftModel) == (method == "prefix")
    reloaded = [unmerged, variant]
    if method in MERGEABLE_METHODS:
        reloaded.append(load_classifier(out))
    else:
        assert not list(out.glob("*.safetensors")), f"a {method} variant has no merged weights"
    assert all(type(inner(model)) is type(base_classifier(encoder_dir, task)) for model in reloaded)
    for batch, trained in zip(batches[task], expected, strict=True):
        for model in reloaded:
            torch.testing.assert_close(logits(model, batch), trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", TASKS)
def test_lora_adapter_folder_holds_little_more_than_the_trained_weights(
    task, adapted, zoo, encoder_dir
):
    out, _ = adapted(task, "lora")
    spec = zoo.adapt.variants["lora"]
    trainable, _ = count_trainable(adapt_model(base_classifier(encoder_dir, task), spec, "lora"))
    files = [path for path in (out / ADAPTER_DIR).rglob("*") if path.is_file()]
    size = sum(path.stat().st_size for path in files)
    assert size < trainable * 4 * 1.5 + 8 * 1024  # float32 weights, config and model card
    assert size < (out / "model.safetensors").stat().st_size / 50


@pytest.mark.parametrize(("task", "method"), cases(MERGEABLE_METHODS))
def test_merged_and_unmerged_agree(task, method, adapted, batches, encoder_dir):
    out, _ = adapted(task, method)
    merged = load_variant(out)

    check = merge_agreement(merged, load_unmerged(out), batches[task])
    untrained = merge_agreement(merged, base_classifier(encoder_dir, task), batches[task])

    assert check["merge_agreement"] == 1.0 and check["merge_max_abs_diff"] < 1e-5
    assert untrained["merge_max_abs_diff"] > 1e-2  # the check sees an adapter's effect


def scored_logits(model, batch) -> torch.Tensor:
    """Logits of every text, or of every labelled token."""
    out = logits(model, batch).float()
    return out[batch["labels"] != IGNORE_INDEX] if out.dim() == 3 else out


@pytest.mark.parametrize("scheme", ["dynamic_int8_embeddings", "onnx_fp32", "onnx_dynamic_int8"])
@pytest.mark.parametrize("task", TASKS)
def test_merged_lora_quantizes_like_any_variant(task, scheme, adapted, batches, tmp_path):
    """What the quantize stage does to a `lora` source (lora_int8, lora_onnx_int8)."""
    source, _ = adapted(task, "lora")
    merged = load_variant(source)
    target = tmp_path / scheme
    if scheme.startswith("onnx"):
        calibration = [model_inputs(batch) for batch in batches[task]]
        target.mkdir()
        save_onnx_variant(merged, source, target, scheme, calibration[0], calibration)
    else:
        save_quantized(quantize_model(merged, scheme), source, target, scheme)

    quantized = load_variant(target)

    assert not (target / ADAPTATION_FILE).exists() and not (target / ADAPTER_DIR).exists()
    if scheme.startswith("onnx"):
        assert isinstance(quantized, OnnxClassifier)
    else:
        assert scheme_of(quantized) == scheme
    reference = torch.cat([scored_logits(merged, batch) for batch in batches[task]])
    found = torch.cat([scored_logits(quantized, batch) for batch in batches[task]])
    if scheme == "onnx_fp32":
        torch.testing.assert_close(found, reference, atol=1e-4, rtol=0)
    else:
        assert (found - reference).abs().max() <= 0.1 * reference.abs().max()
        assert (found.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9


# --- config errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # The key is named without pydantic's union tag (not adapt.variants.lora.lora.alpha).
        (["adapt.variants.lora.alpha=0"], "adapt.variants.lora.alpha: Input should be greater"),
        (["+adapt.variants.lora.rank=4"], "adapt.variants.lora.rank: unknown key"),
        (["+adapt.variants.bitfit.r=4"], "adapt.variants.bitfit.r: unknown key"),
        (["adapt.variants.lora.target_modules=[]"], "adapt.variants.lora.target_modules:"),
        (
            ["+adapt.variants.x={method: houlsby}"],
            "adapt.variants.x: Input tag 'houlsby' found using 'method' does not match any of "
            "the expected tags: 'lora', 'adalora', 'ia3', 'prefix', 'bitfit', 'bottleneck'",
        ),
        (
            ["+quantize.variants.pq={source: prefix, scheme: onnx_dynamic_int8}"],
            "quantize.variants.pq.source: 'prefix' is prefix-tuned",
        ),
        (
            ["+quantize.variants.bq={source: bottleneck, scheme: dynamic_int8}"],
            "quantize.variants.bq.source: 'bottleneck' is bottleneck-tuned; its adapter cannot",
        ),
        (["adapt.variants.bottleneck.size=0"], "adapt.variants.bottleneck.size: Input should"),
        (["adapt.variants.bottleneck.activation=tanh"], "adapt.variants.bottleneck.activation"),
        (
            ["adapt.variants.adalora.target_r=16"],
            "adapt.variants.adalora: Value error, target_r must not exceed init_r",
        ),
        (
            ["adapt.variants.adalora.tinit=0.5", "adapt.variants.adalora.tfinal=0.5"],
            "adapt.variants.adalora: Value error, tinit + tfinal must leave steps",
        ),
        (
            [
                "adapt.variants.ia3.target_modules=[key, value]",
                "adapt.variants.ia3.feedforward_modules=[intermediate.dense]",
            ],
            "adapt.variants.ia3: Value error, feedforward_modules ['intermediate.dense'] are not",
        ),
        (["adapt.variants.prefix.num_virtual_tokens=0"], "adapt.variants.prefix.num_virtual"),
    ],
)
def test_bad_adapter_declarations_name_their_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        compose_config(["experiment=zoo", *overrides])
    assert message in str(error.value)


@pytest.mark.parametrize("target", ["nonexistent", "uery"])  # peft matches at dot boundaries
@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
def test_unknown_target_module_is_named_when_adapting(method, target, encoder_dir):
    cfg = compose_config(
        [
            "experiment=zoo",
            f"adapt.variants.{method}.target_modules=[{target}]",
            *(["adapt.variants.ia3.feedforward_modules=[]"] if method == "ia3" else []),
        ]
    )
    base = base_classifier(encoder_dir, "classification")

    with pytest.raises(ConfigError) as error:
        adapt_model(base, cfg.adapt.variants[method], f"adapt.variants.{method}")

    assert f"adapt.variants.{method}.target_modules: '{target}' matches no module" in str(
        error.value
    )
    assert "attention.self.query" in str(error.value)  # the modules there are are listed


def test_feedforward_modules_outside_the_default_targets_are_named(encoder_dir):
    cfg = compose_config(["experiment=zoo", "adapt.variants.ia3.feedforward_modules=[query]"])
    base = base_classifier(encoder_dir, "classification")

    with pytest.raises(ConfigError) as error:
        adapt_model(base, cfg.adapt.variants["ia3"], "adapt.variants.ia3")

    assert "adapt.variants.ia3.feedforward_modules: ['query'] are not among the target" in str(
        error.value
    )


def test_null_targets_are_the_familys_defaults(zoo, encoder_dir):
    """The zoo leaves every target null: LoRA and AdaLoRA adapt BERT's queries and values, IA3
    its keys, values and `output.dense` (feedforward), as the family table says."""
    base = base_classifier(encoder_dir, "classification")
    for method, targets, feedforward in [
        ("lora", {"query", "value"}, None),
        ("adalora", {"query", "value"}, None),
        ("ia3", {"key", "value", "output.dense"}, {"output.dense"}),
    ]:
        model = adapt_model(copy.deepcopy(base), zoo.adapt.variants[method], method)
        config = model.peft_config["default"]
        assert config.target_modules == targets, method
        assert getattr(config, "feedforward_modules", None) == feedforward, method


def test_a_longer_target_path_selects_only_its_modules(zoo, encoder_dir):
    spec = zoo.adapt.variants["lora"].model_copy(update={"target_modules": ["self.query"]})
    model = adapt_model(base_classifier(encoder_dir, "classification"), spec, "lora")
    adapted = {name.split(".lora_A")[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert all(name.endswith(".attention.self.query") for name in adapted)
    assert len(adapted) == model.config.num_hidden_layers


# --- AdaLoRA's rank budget --------------------------------------------------------------------

ADALORA_EPOCHS = 3  # 7 batches of 16 each: 21 optimizer steps
INTERRUPT_AT = 9  # a signal in step 10's batch stops after it (mid-epoch and mid-schedule)


class SignalAt(L.Callback):
    """Send this process SIGTERM in the batch of global step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def prepared(encoder_dir, tmp_path_factory):
    """(config, layout) of the smoke data prepared and tokenized for `encoder_dir`."""
    cfg = compose_config(
        [
            "experiment=smoke",
            f"model.name={encoder_dir}",
            "tracking.enabled=false",
            "dataset.max_train_samples=120",
            "dataset.max_test_samples=40",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
        ]
    )
    layout = dvc_layout(tmp_path_factory.mktemp("prepared"))
    prepare.run(cfg, layout)
    tokenize.run(cfg, layout)
    return cfg, layout


def adalora_spec(zoo):
    """The zoo's AdaLoRA with a budget step every 2 steps: masks within 21 steps."""
    return zoo.adapt.variants["adalora"].model_copy(update={"delta_t": 2})


def adalora_model(zoo, prepared):
    """A fresh AdaLoRA model over the base classifier of the prepared labels."""
    cfg, layout = prepared
    torch.manual_seed(0)
    base = load_base_classifier(cfg.model.name, read_label_map(layout.tokenized)["labels"])
    return adapt_model(base, adalora_spec(zoo), "adapt.variants.adalora")


def fit_adalora(zoo, prepared, work_dir, *extra):
    """Train AdaLoRA as the adapt stage does: its budget callback and orthogonality penalty."""
    cfg, layout = prepared
    spec = adalora_spec(zoo)
    model = adalora_model(zoo, prepared)
    module = ClassifierModule(
        model,
        lr=1e-2,
        regularizer=lambda: orthogonality_penalty(model),
        regularizer_weight=spec.orth_reg_weight,
    )
    budget = AdaLoraBudget(model, spec)
    L.seed_everything(0)
    fit_resumable(
        module,
        build_datamodule(cfg, layout),
        cfg.trainer,
        work_dir,
        max_epochs=ADALORA_EPOCHS,
        checkpoint_every_n_steps=5,
        callbacks=[budget, *extra],
    )
    return model, budget


@pytest.fixture(scope="module")
def adalora_runs(zoo, prepared, tmp_path_factory):
    """An uninterrupted AdaLoRA run; one a signal stopped at step 10, its checkpoint, and its
    resumed run."""
    from trimflow.utils.interrupt import StageInterrupted

    runs = {"uninterrupted": fit_adalora(zoo, prepared, tmp_path_factory.mktemp("a"))}
    work = tmp_path_factory.mktemp("b")
    with pytest.raises(StageInterrupted):
        fit_adalora(zoo, prepared, work, SignalAt(INTERRUPT_AT))
    checkpoint = torch.load(work / LAST_CHECKPOINT, map_location="cpu", weights_only=False)
    runs["checkpoint"] = checkpoint
    runs["resumed"] = fit_adalora(zoo, prepared, work)
    return runs


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if ".lora_" in name}


def test_adalora_budget_masks_the_least_important_singular_values(adalora_runs, zoo):
    model, _ = adalora_runs["uninterrupted"]
    spec = adalora_spec(zoo)
    config = model.peft_config["default"]
    assert (config.total_step, config.tinit, config.tfinal) == (21, 2, 4)  # from the trainer
    pattern = config.rank_pattern
    assert pattern is not None and len(pattern) == 2 * model.config.num_hidden_layers
    assert sum(sum(kept) for kept in pattern.values()) == spec.target_r * len(pattern)
    for name, kept in pattern.items():
        values = model.get_parameter(f"base_model.model.{name}").detach().view(-1)
        assert (values == 0).tolist() == [not keep for keep in kept], name


def test_adalora_resumed_run_allocates_as_the_uninterrupted_one(adalora_runs):
    """The allocator's statistics and rank pattern travel in the checkpoint: a run resumed
    mid-schedule ends with the same rank pattern and the same weights."""
    (uninterrupted, _), (resumed, _) = adalora_runs["uninterrupted"], adalora_runs["resumed"]
    assert adalora_runs["checkpoint"]["global_step"] == INTERRUPT_AT + 1
    assert (
        resumed.peft_config["default"].rank_pattern
        == uninterrupted.peft_config["default"].rank_pattern
    )
    expected = lora_weights(uninterrupted)
    assert all(torch.equal(value, expected[name]) for name, value in lora_weights(resumed).items())


def test_adalora_budget_state_round_trips(adalora_runs, zoo, prepared):
    """load_state_dict holds a checkpoint's state; on_train_start puts it into the allocator
    and the config of a fresh model."""
    state = adalora_runs["checkpoint"]["callbacks"]["AdaLoraBudget"]
    assert state["ipt"] and state["rank_pattern"]  # mid-schedule: statistics and a mask
    spec = adalora_spec(zoo)
    model = adalora_model(zoo, prepared)
    budget = AdaLoraBudget(model, spec)
    allocator, config = model.base_model.rankallocator, model.peft_config["default"]

    budget.load_state_dict(state)
    assert allocator.ipt == {} and config.rank_pattern is None  # held until training starts
    budget.on_train_start(SimpleNamespace(estimated_stepping_batches=21), None)

    assert config.rank_pattern == state["rank_pattern"]
    restored = budget.state_dict()
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        assert restored[key].keys() == state[key].keys()
        assert all(torch.equal(restored[key][n], state[key][n]) for n in state[key])
    assert (config.total_step, config.tinit, config.tfinal) == (21, 2, 4)


def test_allocated_adalora_saves_its_kept_ranks_and_reloads(
    adalora_runs, zoo, prepared, batches, packaged_tokenizer, tmp_path
):
    model = copy.deepcopy(adalora_runs["uninterrupted"][0]).eval()
    spec = adalora_spec(zoo)
    expected = [logits(model, batch) for batch in batches["classification"]]
    cfg, layout = prepared
    label_map = read_label_map(layout.tokenized)

    save_adapted(model, spec, cfg.model.name, packaged_tokenizer, label_map, tmp_path)

    saved = load_file(tmp_path / ADAPTER_DIR / "adapter_model.safetensors")
    ranks = [tensor.shape[0] for name, tensor in saved.items() if "lora_E" in name]
    assert sum(ranks) == spec.target_r * len(ranks) and max(ranks) <= spec.init_r
    for reloaded in (load_unmerged(tmp_path), load_variant(tmp_path)):
        for batch, trained in zip(batches["classification"], expected, strict=True):
            torch.testing.assert_close(logits(reloaded, batch), trained, atol=1e-5, rtol=0)


def test_orthogonality_penalty_is_the_term_peft_adds_to_the_loss(zoo, encoder_dir, batches):
    spec = zoo.adapt.variants["adalora"]
    model = adapt_model(base_classifier(encoder_dir, "classification"), spec, "adalora").eval()
    batch = batches["classification"][0]
    with torch.no_grad():
        output = model(**batch)
        task_loss = torch.nn.functional.cross_entropy(output.logits, batch["labels"])
        penalty = orthogonality_penalty(model)
    assert penalty > 1.0  # random singular vectors are far from orthonormal
    assert output.loss.item() == pytest.approx(
        task_loss.item() + spec.orth_reg_weight * penalty.item(), rel=1e-5
    )


def test_adalora_validation_loss_is_the_task_loss(zoo, encoder_dir, batches):
    spec = zoo.adapt.variants["adalora"]
    model = adapt_model(base_classifier(encoder_dir, "classification"), spec, "adalora")
    module = ClassifierModule(
        model,
        lr=1e-3,
        regularizer=lambda: orthogonality_penalty(model),
        regularizer_weight=spec.orth_reg_weight,
    )
    (logged,) = quiet_trainer().validate(
        module, dataloaders=DataLoader(batches["classification"], batch_size=None), verbose=False
    )
    model.eval()  # validate() hands the module back in training mode
    with torch.no_grad():  # batches of equal size: the epoch's loss is the mean of theirs
        losses = [
            torch.nn.functional.cross_entropy(logits(model, batch), batch["labels"])
            for batch in batches["classification"]
        ]
    assert logged["val/loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-4)


# --- the adapt stage --------------------------------------------------------------------------


def test_adapt_stage_writes_a_merged_ner_lora_variant(tiny_config, tmp_path):
    cfg = tiny_config("task=ner")
    layout = dvc_layout(tmp_path)
    prepare.run(cfg, layout)
    tokenize.run(cfg, layout)

    adapt.run(cfg, layout, "lora")

    out = layout.model_dir("lora")
    adapter = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["task_type"] == "TOKEN_CLS" and adapter["peft_type"] == "LORA"
    adaptation = json.loads((out / ADAPTATION_FILE).read_text())
    assert adaptation["merged"] is True and adaptation["method"] == "lora"
    assert adaptation["base_model"] == cfg.model.name
    summary = json.loads((out / "training.json").read_text())
    assert summary["method"] == "lora" and summary["global_step"] > 0
    assert summary["resumed_from_step"] is None
    assert type(load_variant(out)).__name__ == "BertForTokenClassification"
    assert not layout.model_dir("bitfit").exists(), "only the selected variant is built"
    assert not layout.work.exists() or not any(layout.work.iterdir())


def same_files(left, right, names) -> bool:
    """The safetensors files `names` hold the same tensors in both folders."""
    for name in names:
        a, b = load_file(left / name), load_file(right / name)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


@pytest.mark.slow
def test_killed_adapt_resumes_to_the_uninterrupted_variant(tiny_config, tmp_path):
    """`trimflow adapt` SIGKILLed after its first checkpoint: a rerun resumes from it and
    ends with the adapter, merged model and history of an uninterrupted run."""
    cfg = tiny_config(
        "adapt.max_epochs=6",
        "finetune.batch_size=8",
        "finetune.checkpoint_every_n_steps=5",
        "finetune.early_stopping_patience=6",
    )
    layouts = {}
    for name in ("killed", "uninterrupted"):
        layouts[name] = dvc_layout(tmp_path / name)
        prepare.run(cfg, layouts[name])
        tokenize.run(cfg, layouts[name])
    adapt.run(cfg, layouts["uninterrupted"], "lora")
    root, layout = tmp_path / "killed", layouts["killed"]
    (root / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    command = [sys.executable, "-m", "trimflow.cli", "adapt", "--variant", "lora"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    while not list(layout.work.glob(f"*/{LAST_CHECKPOINT}")):
        assert first.poll() is None, "adapt ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the deadline"
        time.sleep(0.05)
    time.sleep(1.0)  # let it train past the checkpoint before the kill
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not layout.model_dir("lora").exists(), "a killed run must not leave a model behind"

    rerun = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Resuming from" in rerun.stderr
    killed, uninterrupted = layout.model_dir("lora"), layouts["uninterrupted"].model_dir("lora")
    summary = json.loads((killed / "training.json").read_text())
    assert summary["resumed_from_step"] >= 5 and summary["global_step"] == 6 * 14
    assert same_files(
        killed, uninterrupted, [f"{ADAPTER_DIR}/adapter_model.safetensors", "model.safetensors"]
    )
    assert (killed / "history.csv").read_text() == (uninterrupted / "history.csv").read_text()
