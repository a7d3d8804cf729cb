"""Word attributions of a classification variant's predicted label, with Captum.

Each text is tokenized as the served model tokenizes it (`VariantModel`, `truncate_texts`), and
its word pieces are grouped into words as the training data splits them (on whitespace). Two
methods attribute the logit of the predicted label to those words:

- integrated gradients (`ig`, Sundararajan et al., 2017): captum's `LayerIntegratedGradients` on
  the word-embedding layer, from a baseline of pad tokens that keeps the special tokens, token
  attributions summed to words; they add up to f(text) - f(baseline) (completeness), up to
  captum's convergence delta. Torch variants with float weights only (it needs gradients).
- feature ablation (`ablation`): captum's `FeatureAblation`, each word's pieces replaced by pad
  tokens in turn; a word's attribution is how much the logit drops without it. Forward passes
  only (one per word, `ABLATION_BATCH` at a time, and one of the text), so it explains every
  variant: torch, ONNX Runtime and OpenVINO. A dynamically quantized variant (torch or ONNX
  Runtime dynamic int8) scales its int8 activations over the whole batch, so that a perturbed
  copy's logit would depend on the copies beside it (MiniLM, ONNX dynamic int8, batches of 8:
  the attributions moved by up to 70% of the largest one): it gets one copy per pass.

`auto` picks integrated gradients where it can run and ablation elsewhere.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from captum.attr import FeatureAblation, LayerIntegratedGradients
from torch import Tensor, nn

from trimflow.compress.onnx import OnnxClassifier
from trimflow.compress.quantize import INT8_QCONFIGS, scheme_of
from trimflow.data.truncation import SpecialTokens, keep_pieces, truncate_texts
from trimflow.explain import METHODS
from trimflow.serving.pyfunc import WORD, VariantModel, invalid_input, validate_texts

IG_STEPS = 50  # captum's default number of steps of the path integral
IG_BATCH = 10  # path points per forward and backward pass
ABLATION_BATCH = 8  # perturbed copies of a text per forward pass (captum's perturbations_per_eval)
log = logging.getLogger(__name__)


class ExplainError(ValueError):
    """A variant or method that cannot explain: a NER variant, gradients of a graph or int8."""


@dataclass(frozen=True)
class EncodedText:
    """One text as the served model reads it, and the word each of its kept pieces belongs to.

    inputs: the model inputs, a batch of one, special tokens included.
    pieces: where the text's kept pieces lie in `input_ids` (between the special tokens).
    piece_words: the word of each kept piece, an index into `spans`.
    spans: the character span (start, end) of each word the model reads, in text order.
    """

    inputs: dict[str, Tensor]
    pieces: slice
    piece_words: np.ndarray
    spans: list[tuple[int, int]]

    def with_ids(self, input_ids: Tensor) -> dict[str, Tensor]:
        """Model inputs of one row per row of `input_ids` (this text's length): those ids, with
        this text's segment ids and attention mask."""
        rows = {name: value.expand(len(input_ids), -1) for name, value in self.inputs.items()}
        return {**rows, "input_ids": input_ids}

    def with_pieces(self, piece_ids: Tensor) -> dict[str, Tensor]:
        """Model inputs of one row per row of `piece_ids`: this text with its pieces replaced
        by that row (special tokens, segment ids and attention mask kept)."""
        input_ids = self.inputs["input_ids"].repeat(len(piece_ids), 1)
        input_ids[:, self.pieces] = piece_ids
        return self.with_ids(input_ids)

    def piece_ids(self) -> Tensor:
        """The ids of the text's kept pieces, a batch of one."""
        return self.inputs["input_ids"][:, self.pieces]

    def baseline_ids(self, pad_id: int) -> Tensor:
        """`input_ids` with every piece of the text a pad token, the special tokens kept."""
        return self.with_pieces(torch.full_like(self.piece_ids(), pad_id))["input_ids"]


def encode_texts(model: VariantModel, texts: list[str]) -> list[EncodedText]:
    """`texts` tokenized as `model` tokenizes them when it predicts (`truncate_texts`), each
    kept piece assigned to the whitespace-separated word its first character falls in."""
    kept = truncate_texts(model.tokenizer, texts, model.max_length, model.truncation)
    special = SpecialTokens.of(model.tokenizer)
    budget = model.max_length - special.count
    first = len(special.prefix)
    encoded = []
    for row, (text, encoding) in enumerate(zip(texts, kept.encodings, strict=True)):
        pieces = keep_pieces(range(len(encoding.ids)), budget, model.truncation)
        words = [match.span() for match in WORD.finditer(text)]
        starts = [start for start, _ in words]
        piece_words = [
            max(bisect_right(starts, encoding.offsets[piece][0]) - 1, 0) for piece in pieces
        ]
        seen = sorted(set(piece_words))
        position = {word: index for index, word in enumerate(seen)}
        encoded.append(
            EncodedText(
                inputs={name: torch.tensor([values[row]]) for name, values in kept.inputs.items()},
                pieces=slice(first, first + len(pieces)),
                piece_words=np.array([position[word] for word in piece_words], dtype=np.int64),
                spans=[words[word] for word in seen],
            )
        )
    return encoded


def has_gradients(network: object) -> bool:
    """Whether integrated gradients can run through `network`: a torch module whose weights
    are not int8 (an exported graph or a torch int8 model has no gradients)."""
    return isinstance(network, nn.Module) and scheme_of(network) not in INT8_QCONFIGS


def scales_per_batch(network: object) -> bool:
    """Whether `network` quantizes its activations dynamically, one scale for the whole batch
    (torch's dynamic int8 modules, ONNX Runtime's DynamicQuantizeLinear), so that a row's
    logits depend on the rows beside it."""
    if isinstance(network, OnnxClassifier):
        graph = onnx.load(str(network.path)).graph
        return any(node.op_type == "DynamicQuantizeLinear" for node in graph.node)
    return isinstance(network, nn.Module) and scheme_of(network) in INT8_QCONFIGS


def explanation_method(model: VariantModel, method: str) -> str:
    """`ig` or `ablation`: `method`, or for `auto` integrated gradients where they can run and
    ablation elsewhere. `ExplainError` for a NER variant, an unknown method, or `ig` on a
    variant without gradients."""
    if model.token_task:
        raise ExplainError("NER explanations are not supported yet: this variant labels words")
    if method not in METHODS:
        raise ExplainError(f"method '{method}' is not one of {', '.join(METHODS)}")
    differentiable = has_gradients(model.model)
    if method == "auto":
        return "ig" if differentiable else "ablation"
    if method == "ig" and not differentiable:
        network = model.model
        kind = scheme_of(network) if isinstance(network, nn.Module) else type(network).__name__
        raise ExplainError(
            f"integrated gradients need a torch variant with float weights, not {kind}: "
            "use method 'ablation'"
        )
    return method


def integrated_gradients(
    model: VariantModel, text: EncodedText, label: int
) -> tuple[np.ndarray, float]:
    """Per-word integrated gradients of logit `label` (see the module docstring) and captum's
    convergence delta: their sum less f(text) - f(baseline)."""
    network = model.model

    def logits(input_ids: Tensor) -> Tensor:
        return network(**text.with_ids(input_ids)).logits.float()

    attributions, delta = LayerIntegratedGradients(
        logits, network.get_input_embeddings()
    ).attribute(
        text.inputs["input_ids"],
        baselines=text.baseline_ids(model.tokenizer.pad_token_id),
        target=label,
        n_steps=IG_STEPS,
        internal_batch_size=IG_BATCH,
        return_convergence_delta=True,
    )
    pieces = attributions.sum(dim=-1)[0, text.pieces].double().numpy()
    return np.bincount(text.piece_words, pieces, minlength=len(text.spans)), float(delta)


def feature_ablation(
    model: VariantModel, text: EncodedText, label: int, copies_per_pass: int
) -> np.ndarray:
    """Per-word feature ablation of logit `label`: its drop when the word's pieces are pad
    tokens, `copies_per_pass` perturbed copies of the text per forward pass (see the module
    docstring)."""

    def logits(piece_ids: Tensor) -> Tensor:
        return model.model(**text.with_pieces(piece_ids)).logits.float()

    with torch.inference_mode():
        attributions = FeatureAblation(logits).attribute(
            text.piece_ids(),
            baselines=model.tokenizer.pad_token_id,
            target=label,
            feature_mask=torch.from_numpy(text.piece_words)[None],
            perturbations_per_eval=copies_per_pass,
        )
    words = np.zeros(len(text.spans))
    words[text.piece_words] = attributions[0].double().numpy()  # a word's pieces share its value
    return words


@dataclass(frozen=True)
class Attribution:
    """One text's word attributions for its predicted label, and what they cost."""

    text: str
    encoded: EncodedText
    prediction: dict  # the served answer: label, score, truncated
    method: str
    values: np.ndarray  # one per word of `encoded.spans`
    convergence_delta: float | None  # integrated gradients' (None for ablation)
    cost_ms: float

    def record(self) -> dict:
        """The explanation as JSON: text, label, score, truncated, method, the words with their
        character spans and attributions, the convergence delta and the cost in ms."""
        return {
            "text": self.text,
            **self.prediction,
            "method": self.method,
            "words": [
                {"word": self.text[start:end], "start": start, "end": end, "attribution": value}
                for (start, end), value in zip(
                    self.encoded.spans, self.values.tolist(), strict=True
                )
            ],
            "convergence_delta": self.convergence_delta,
            "cost_ms": round(self.cost_ms, 1),
        }


def attribute_texts(
    model: VariantModel, texts: list, method: str = "auto"
) -> Iterator[Attribution]:
    """Each text's `Attribution` by `method` (`explanation_method`), in order. Texts are checked
    first as `predict` checks them (`MlflowException` naming a bad item), and each must have a
    word the tokenizer keeps."""
    method = explanation_method(model, method)
    texts = validate_texts(texts, model.max_chars)
    encoded_texts = encode_texts(model, texts)
    for index, encoded in enumerate(encoded_texts):
        if not encoded.spans:
            raise invalid_input(f"input[{index}] has no word the tokenizer keeps")
    predictions = model.predict_texts(texts)
    copies_per_pass = 1 if scales_per_batch(model.model) else ABLATION_BATCH
    for index, (text, encoded, prediction) in enumerate(
        zip(texts, encoded_texts, predictions, strict=True)
    ):
        label = model.labels.index(prediction["label"])
        started = time.perf_counter()
        if method == "ig":
            values, delta = integrated_gradients(model, encoded, label)
        else:
            values, delta = feature_ablation(model, encoded, label, copies_per_pass), None
        cost_ms = (time.perf_counter() - started) * 1000
        log.info(
            "explained text %d/%d by %s: %d words, %.0f ms",
            index + 1,
            len(texts),
            method,
            len(values),
            cost_ms,
        )
        yield Attribution(text, encoded, prediction, method, values, delta, cost_ms)


def explain_texts(model: VariantModel, texts: list, method: str = "auto") -> list[dict]:
    """The explanation (`Attribution.record`) of each text by `method`."""
    return [attribution.record() for attribution in attribute_texts(model, texts, method)]


def ablation_word_attributions(model: VariantModel, texts: list[str]) -> list[np.ndarray]:
    """Per text, the feature-ablation attribution of each word the model reads, for its
    predicted label (what evaluate compares between variants: `agreement.py`)."""
    return [attribution.values for attribution in attribute_texts(model, texts, "ablation")]
