"""Embedding-space adversarial training (`finetune.adversarial`): FGM and PGD.

A forward hook on the model's input embeddings (`get_input_embeddings()`, the word embeddings of
every family) adds a perturbation to their output. The clean pass runs with a zero perturbation
that requires grad, so its loss gives the gradient w.r.t. that output, frozen embeddings
(adapters) included; the perturbation then ascends it (FGM: one step of size epsilon; PGD:
`steps` steps of size `alpha`, each projected onto the epsilon ball, L2 per example), and the
step trains on (1 - weight) * clean + weight * adversarial loss. The clean graph is kept for the
optimizer's backward, so a step holds the activations of two passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from trimflow.config.loading import ConfigError
from trimflow.config.schema import AdversarialConfig, TrimflowConfig

# A pass of the model over a batch: its named loss terms, `loss` the one trained on.
LossTerms = Callable[[], dict[str, Tensor]]
# Below this gradient norm an example's ascent direction is taken as zero.
TINY_NORM = 1e-12


def adversarial_settings(cfg: TrimflowConfig) -> AdversarialConfig:
    """`finetune.adversarial`, refused with `trainer.compile` (a compiled model ignores hooks
    added after compilation, so the perturbation would silently not apply)."""
    settings = cfg.finetune.adversarial
    if settings.method != "none" and cfg.trainer.compile:
        raise ConfigError(
            f"finetune.adversarial.method: {settings.method} perturbs the embeddings through a"
            " forward hook, which a compiled model ignores: set trainer.compile=false"
        )
    return settings


class EmbeddingShift:
    """While entered, adds `delta` to the output of the model's input embeddings.

    Until `delta` is set, the first pass sets it to a zero that requires grad.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.embeddings: nn.Module = model.get_input_embeddings()
        self.delta: Tensor | None = None
        self._handle = None

    def __enter__(self) -> EmbeddingShift:
        self._handle = self.embeddings.register_forward_hook(self._add_delta)
        return self

    def __exit__(self, *exc_info) -> None:
        self._handle.remove()

    def _add_delta(self, module: nn.Module, args, output: Tensor) -> Tensor:
        if self.delta is None:
            self.delta = torch.zeros_like(output, requires_grad=True)
        return output + self.delta


def _per_example_norm(tensor: Tensor) -> Tensor:
    """The L2 norm of each example's slice of `tensor`, shaped to broadcast against it."""
    return tensor.flatten(1).norm(dim=1).view(-1, *[1] * (tensor.dim() - 1))


def _within_ball(delta: Tensor, epsilon: float) -> Tensor:
    """`delta` with each example's slice scaled back onto the epsilon L2 ball if outside it."""
    return delta * (epsilon / _per_example_norm(delta).clamp_min(TINY_NORM)).clamp(max=1.0)


def perturbation(
    shift: EmbeddingShift, settings: AdversarialConfig, clean_loss: Tensor, loss_of: LossTerms
) -> Tensor:
    """The adversarial shift of the embedding output, from the clean pass's loss (run inside
    `shift`, its graph kept); `loss_of` runs the extra passes PGD ascends through.

    An example whose gradient is zero (no scored token) gets no shift.
    """
    pgd = settings.method == "pgd"
    steps, size = (settings.steps, settings.alpha) if pgd else (1, settings.epsilon)
    loss = clean_loss
    for step in range(steps):
        (gradient,) = torch.autograd.grad(loss, shift.delta, retain_graph=step == 0)
        ascent = gradient / _per_example_norm(gradient).clamp_min(TINY_NORM)
        shift.delta = _within_ball(shift.delta.detach() + size * ascent, settings.epsilon)
        if step + 1 < steps:
            shift.delta.requires_grad_()
            loss = loss_of()["loss"]
    return shift.delta


def adversarial_terms(
    model: PreTrainedModel, settings: AdversarialConfig, loss_of: LossTerms
) -> dict[str, Tensor]:
    """The terms of a training pass of `model` (`loss_of`); with FGM or PGD, `loss` mixes the
    clean loss (`clean_loss`) with that of the perturbed pass (`adversarial_loss`)."""
    if settings.method == "none":
        return loss_of()
    with EmbeddingShift(model) as shift:
        clean = loss_of()
        perturbation(shift, settings, clean["loss"], loss_of)
        adversarial = loss_of()["loss"]
    mixed = (1 - settings.weight) * clean["loss"] + settings.weight * adversarial
    return {**clean, "loss": mixed, "clean_loss": clean["loss"], "adversarial_loss": adversarial}
