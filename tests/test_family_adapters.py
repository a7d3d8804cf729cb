"""Adapters on every encoder family, on tiny random models: LoRA, IA3 and bottleneck adapters
with the family's default targets train only their weights and the head, and LoRA and IA3 merge
to the unmerged logits; AdaLoRA saves and merges whatever the head (a Linear, dense + out_proj,
pre_classifier + classifier, pooler + classifier); a bottleneck variant reloads unmerged; a
model_type outside the family table needs explicit targets, and works with them."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from families import FAMILIES, batches_for, save_tiny_encoder
from helpers import logits
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from trimflow.compress.variants import load_variant
from trimflow.config.loading import ConfigError, compose_config
from trimflow.layout import ADAPTATION_FILE, ADAPTER_DIR
from trimflow.models.adapter_training import AdaLoraBudget, enforce_final_budget
from trimflow.models.adapters import (
    adapt_model,
    check_target_modules,
    head_modules,
    load_unmerged,
    merge_adapter,
    save_adapted,
)
from trimflow.models.families import ENCODER_FAMILIES, encoder_layers
from trimflow.models.loading import load_base_classifier, load_classifier, load_tokenizer

LABELS = ["alpha", "beta", "gamma"]
# What names an adapter's own weights, per method.
ADAPTER_MARKERS = {"lora": ".lora_", "ia3": ".ia3_l.", "bottleneck": ".adapter."}
BOTTLENECK_SIZE = 8  # below the tiny models' width of 32


@pytest.fixture(scope="module")
def zoo():
    """The zoo preset: every method, targets null (the family's defaults)."""
    return compose_config(["experiment=zoo", "tracking.enabled=false"])


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """family -> (a saved tiny encoder and tokenizer, two labelled batches), made once."""
    made = {}

    def get(family: str):
        if family not in made:
            path = save_tiny_encoder(family, tmp_path_factory.mktemp(family))
            made[family] = path, batches_for(load_tokenizer(str(path)))
        return made[family]

    return get


def spec_of(zoo, method: str, **update):
    spec = zoo.adapt.variants[method]
    if method == "bottleneck":
        update.setdefault("size", BOTTLENECK_SIZE)
    return spec.model_copy(update=update)


def base_classifier(encoder_dir):
    """The encoder with a fresh (seeded) head, as the adapt stage loads it."""
    torch.manual_seed(0)
    return load_base_classifier(str(encoder_dir), LABELS)


def train(model, batches, steps: int = 1, after_step=None):
    """`steps` AdamW steps (no weight decay: only weights with a gradient move), each loss
    finite; `after_step(step)` after each."""
    torch.manual_seed(0)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model.train()
    for step in range(1, steps + 1):
        loss = model(**batches[(step - 1) % len(batches)]).loss
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
        optimizer.zero_grad()
    return model.eval()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def inner(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def assert_same_logits(models, batches, expected) -> None:
    for model in models:
        for batch, trained in zip(batches, expected, strict=True):
            torch.testing.assert_close(logits(model, batch), trained, atol=1e-5, rtol=0)


# --- every family, its defaults ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "ia3", "bottleneck"])
@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_train_only_the_adapter_and_the_head(family, method, zoo, encoders):
    encoder_dir, batches = encoders(family)
    base = base_classifier(encoder_dir)
    heads = head_modules(base)
    model = adapt_model(base, spec_of(zoo, method), f"adapt.variants.{method}")
    marker = ADAPTER_MARKERS[method]
    for layer in encoder_layers(inner(model)):  # the defaults reach every layer
        assert any(marker in f".{name}" for name, _ in layer.named_parameters())
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}

    def is_head(name: str) -> bool:
        return "modules_to_save" in name or name.split(".", 1)[0] in heads

    assert all(marker in name or is_head(name) for name in trainable)
    before = snapshot(model)

    train(model, batches)

    after = snapshot(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed <= trainable
    assert any(marker in name for name in changed) and any(map(is_head, changed))
    if method != "bottleneck":
        merged = merge_adapter(copy.deepcopy(model))
        assert type(merged) is type(inner(model))
        assert_same_logits([merged], batches, [logits(model, batch) for batch in batches])


@pytest.mark.parametrize("family", FAMILIES)
def test_adalora_saves_and_merges_whatever_the_head(family, zoo, encoders, tmp_path):
    """After the rank budget is allocated, the adapter (with the head peft keeps in
    `modules_to_save`) is saved cut to the kept ranks, and both the merged model and base +
    adapter compute what the trained model did."""
    encoder_dir, batches = encoders(family)
    spec = spec_of(zoo, "adalora", delta_t=2)
    model = adapt_model(base_classifier(encoder_dir), spec, "adapt.variants.adalora")
    AdaLoraBudget(model, spec).on_train_start(SimpleNamespace(estimated_stepping_batches=6), None)
    train(model, batches, steps=6, after_step=model.base_model.update_and_allocate)
    enforce_final_budget(model)
    expected = [logits(model, batch) for batch in batches]
    label_map = {"labels": LABELS, "dataset_digest": "test"}
    tokenizer = load_tokenizer(str(encoder_dir))

    save_adapted(model, spec, str(encoder_dir), tokenizer, label_map, tmp_path)

    saved = load_file(tmp_path / ADAPTER_DIR / "adapter_model.safetensors")
    ranks = [tensor.shape[0] for name, tensor in saved.items() if "lora_E" in name]
    assert ranks and sum(ranks) == spec.target_r * len(ranks)
    heads = head_modules(inner(model))
    assert {name.split(".")[2] for name in saved if "lora_" not in name} == set(heads)
    assert_same_logits(
        [load_unmerged(tmp_path), load_variant(tmp_path), load_classifier(tmp_path)],
        batches,
        expected,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_bottleneck_variant_starts_as_the_identity_and_reloads_unmerged(
    family, zoo, encoders, tmp_path
):
    encoder_dir, batches = encoders(family)
    spec = spec_of(zoo, "bottleneck")
    base = base_classifier(encoder_dir)
    untouched = [logits(base, batch) for batch in batches]
    model = adapt_model(base, spec, "adapt.variants.bottleneck")
    assert_same_logits([model], batches, untouched)  # the up-projections start at zero
    hidden, layers = model.config.hidden_size, len(encoder_layers(model))
    heads = sum(
        p.numel() for head in head_modules(model) for p in model.get_submodule(head).parameters()
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 2 * layers * (2 * hidden * spec.size + spec.size + hidden) + heads
    train(model, batches, steps=2)  # the down-projections move from the second step on
    expected = [logits(model, batch) for batch in batches]
    label_map = {"labels": LABELS, "dataset_digest": "test"}

    save_adapted(
        model, spec, str(encoder_dir), load_tokenizer(str(encoder_dir)), label_map, tmp_path
    )

    adaptation = json.loads((tmp_path / ADAPTATION_FILE).read_text())
    assert adaptation["method"] == "bottleneck" and adaptation["merged"] is False
    assert not list(tmp_path.glob("*.safetensors")), "no merged weights"
    saved = load_file(tmp_path / ADAPTER_DIR / "bottleneck.safetensors")
    assert sum(tensor.numel() for tensor in saved.values()) == trainable
    variant = load_variant(tmp_path)
    assert type(variant) is type(model)
    assert_same_logits([load_unmerged(tmp_path), variant], batches, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_unknown_target_lists_the_first_layers_modules(family, encoders):
    encoder_dir, _ = encoders(family)
    model = base_classifier(encoder_dir)

    with pytest.raises(ConfigError) as error:
        check_target_modules(model, ["nonexistent"], "adapt.variants.lora.target_modules")

    row = ENCODER_FAMILIES[family]
    assert "linear modules of its first layer: " in str(error.value)
    for path in (row.attention_output, row.ffn_output):
        assert path in str(error.value)


# --- a family outside the table ---------------------------------------------------------------


def tiny_mpnet():
    """A tiny MPNet classifier: its model_type has no row in the family table."""
    config = AutoConfig.for_model(
        "mpnet",
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(LABELS),
    )
    assert config.model_type not in ENCODER_FAMILIES
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


def mpnet_batches():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (2, 4, 10), generator=generator)
    labels = torch.tensor([0, 1, 2, 0])
    return [
        {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": labels}
        for batch in ids
    ]


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
def test_null_targets_outside_the_table_name_the_key(method, zoo):
    with pytest.raises(ConfigError) as error:
        adapt_model(tiny_mpnet(), spec_of(zoo, method), f"adapt.variants.{method}")

    message = str(error.value)
    assert f"adapt.variants.{method}.target_modules: no default for model_type 'mpnet'" in message
    assert "set them explicitly" in message


def test_ia3_outside_the_table_needs_its_feedforward_modules_too(zoo):
    spec = spec_of(zoo, "ia3", target_modules=["k", "v", "output.dense"])
    with pytest.raises(ConfigError, match=r"adapt\.variants\.ia3\.feedforward_modules: no default"):
        adapt_model(tiny_mpnet(), spec, "adapt.variants.ia3")


@pytest.mark.parametrize(
    ("method", "update"),
    [
        ("lora", {"target_modules": ["q", "v"]}),
        (
            "ia3",
            {"target_modules": ["k", "v", "output.dense"], "feedforward_modules": ["output.dense"]},
        ),
    ],
)
def test_explicit_targets_adapt_a_family_outside_the_table(method, update, zoo):
    batches = mpnet_batches()
    model = adapt_model(tiny_mpnet(), spec_of(zoo, method, **update), f"adapt.variants.{method}")
    assert model.peft_config["default"].target_modules == set(update["target_modules"])

    train(model, batches)

    merged = merge_adapter(copy.deepcopy(model))
    assert_same_logits([merged], batches, [logits(model, batch) for batch in batches])


def test_unknown_targets_outside_the_table_list_its_linear_modules(zoo):
    spec = spec_of(zoo, "lora", target_modules=["query"])
    with pytest.raises(ConfigError) as error:
        adapt_model(tiny_mpnet(), spec, "adapt.variants.lora")

    message = str(error.value)
    assert "adapt.variants.lora.target_modules: 'query' matches no module" in message
    assert "its linear modules: mpnet.encoder.layer.0.attention.attn.q, " in message


def test_bottleneck_outside_the_table_is_refused_naming_the_model_type(zoo):
    with pytest.raises(ConfigError, match="adapt.variants.bottleneck .*model_type 'mpnet'"):
        adapt_model(tiny_mpnet(), spec_of(zoo, "bottleneck"), "adapt.variants.bottleneck")


# Encoders whose attention takes no past keys and values, so no prefix.
WITHOUT_KEY_VALUE_CACHE = {"distilbert", "deberta-v2", "modernbert"}


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_tuning_trains_or_is_refused_before_training(family, zoo, encoders):
    encoder_dir, batches = encoders(family)
    base = base_classifier(encoder_dir)
    if family in WITHOUT_KEY_VALUE_CACHE:
        with pytest.raises(ConfigError, match=f"adapt.variants.prefix.method: .*'{family}'"):
            adapt_model(base, spec_of(zoo, "prefix"), "adapt.variants.prefix")
        return
    model = adapt_model(base, spec_of(zoo, "prefix"), "adapt.variants.prefix")
    before = snapshot(model)
    train(model, batches)
    after = snapshot(model)
    assert any(
        "prompt_encoder" in name and not torch.equal(before[name], after[name]) for name in before
    )
