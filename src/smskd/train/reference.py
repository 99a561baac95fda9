"""The frozen reference model and its TCP-weighted loss (DESIGN.md §1).

From stage 2 on, the student as it left the previous stage is frozen and its
predictions anchor the current student, sample by sample:

    TCP_i    = softmax(t_i / T_tcp)[y_i]                    (teacher's true-class probability)
    w_i      = λ·(1 − TCP_i) | λ·TCP_i | λ | 0              (inverse_tcp | tcp | fixed | none)
               (weight_scale batch_mean: w_i · λ / mean_batch(w), so the batch mean is λ)
    L_ref,i  = τ² · KL(softmax(r_i/τ) ‖ softmax(s_i/τ))     (or mean squared logit difference)
               (anchor logits+embedding: + mean_d (e^s_id − e^r_id)², penultimate embeddings)
    L_ref    = mean_i(w_i · L_ref,i)

The paper fixes the TCP-based per-sample weighting but not its direction or the
loss form; our defaults and their alternatives are in shared/PAPER.md.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import Tensor, nn
from torch.fx.experimental.optimization import fuse

from smskd.config import ReferenceConfig
from smskd.methods.functional import soft_kl


def make_reference(
    student: nn.Module, state: dict[str, Tensor] | None = None, *, fold: bool = True
) -> nn.Module:
    """A frozen copy of ``student`` (with ``state`` loaded, as on resume) that only ever
    runs forward: eval mode, no gradients, never trained, in :func:`inference_form`
    (``fold=False``: without folding BatchNorms, which would trace the network anew and
    could lose a module whose features are tapped)."""
    reference = copy.deepcopy(student)
    if state is not None:
        reference.load_state_dict(state)
    reference.eval()
    reference.requires_grad_(False)
    return inference_form(reference, fold=fold)


def tap_target(reference: nn.Module) -> nn.Module:
    """The module whose submodules carry the student's names: where the reference's
    features are tapped (:func:`inference_form` may wrap the network)."""
    return reference.network if isinstance(reference, _ChannelsLast) else reference


def inference_form(model: nn.Module, *, fold: bool = True) -> nn.Module:
    """The same function, cheaper to evaluate (outputs equal up to float rounding).

    The reference's extra forward is SMSKD's only per-step overhead over KD, so it is
    made as cheap as an eval-mode network allows: each BatchNorm is folded into the
    convolution before it (``torch.fx``; a model that cannot be traced stays as it is),
    and convolutional networks run channels-last, which CPUs and GPUs convolve faster.
    """
    # Tracing fails in many ways on models with data-dependent control flow: keep those.
    if fold:
        with contextlib.suppress(Exception):
            model = fuse(model)
    model.requires_grad_(False)  # fused convolutions come with fresh Parameters
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return _ChannelsLast(model.to(memory_format=torch.channels_last)).eval()
    return model


class _ChannelsLast(nn.Module):
    """Feeds its network NHWC inputs (the layout of its weights)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.network(x)


def true_class_probability(
    teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0
) -> Tensor:
    """``softmax(t / T)[y]`` per sample — not the max probability, which hides teacher errors."""
    probs = torch.softmax(teacher_logits.float() / temperature, dim=1)
    return probs.gather(1, labels.view(-1, 1)).squeeze(1)


def reference_weights(weighting: str, lam: float, tcp: Tensor, scale: str = "raw") -> Tensor:
    """Per-sample weights; ``scale="batch_mean"`` rescales them to mean λ (equal weights
    λ when every raw weight is 0: the shape says nothing then, and the scale is kept)."""
    if weighting == "inverse_tcp":
        weights = lam * (1.0 - tcp)
    elif weighting == "tcp":
        weights = lam * tcp
    elif weighting == "fixed":
        weights = torch.full_like(tcp, lam)
    elif weighting == "none":
        return torch.zeros_like(tcp)
    else:
        raise ValueError(f"unknown weighting {weighting!r}")
    if scale == "batch_mean":
        mean = weights.mean()
        weights = torch.where(
            mean > 0, weights * (lam / mean.clamp_min(1e-30)), torch.full_like(weights, lam)
        )
    return weights


def per_sample_reference_loss(
    student_logits: Tensor, reference_logits: Tensor, kind: str, temperature: float
) -> Tensor:
    if kind == "kl":
        return soft_kl(student_logits.float(), reference_logits.float(), temperature)
    if kind == "mse_logits":
        return (student_logits.float() - reference_logits.float()).pow(2).mean(dim=1)
    raise ValueError(f"unknown reference loss {kind!r}")


def reference_term(
    cfg: ReferenceConfig,
    student_logits: Tensor,
    reference_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    embeddings: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``mean_i(w_i · L_ref,i)`` and the weights ``w`` (for logging their distribution).
    ``embeddings``: the student's and the reference's penultimate embeddings, anchored
    too when ``cfg.anchor`` says so."""
    if cfg.needs_teacher:
        if teacher_logits is None:
            raise ValueError(f"reference weighting {cfg.weighting!r} needs teacher logits")
        tcp = true_class_probability(teacher_logits, labels, cfg.tcp_softmax_temperature)
    else:
        tcp = torch.ones(len(labels), device=labels.device)
    weights = reference_weights(cfg.weighting, cfg.lam, tcp, cfg.weight_scale)
    per_sample = per_sample_reference_loss(
        student_logits, reference_logits, cfg.loss, cfg.temperature
    )
    if cfg.anchor == "logits+embedding":
        if embeddings is None:
            raise ValueError("reference anchor 'logits+embedding' needs both embeddings")
        student_embedding, reference_embedding = (e.float().flatten(1) for e in embeddings)
        per_sample = per_sample + (student_embedding - reference_embedding).pow(2).mean(dim=1)
    return (weights * per_sample).mean(), weights


WEIGHT_BINS = 20


def weight_histogram(weights: Tensor, lam: float, bins: int = WEIGHT_BINS) -> Tensor:
    """Fraction of the batch in each of ``bins`` equal bins of ``w_i / λ`` on [0, 1].

    Relative to λ, so runs with different λ share one axis; for ``inverse_tcp`` it is
    the distribution of ``1 − TCP``, for ``fixed`` a spike in the last bin.
    """
    relative = weights.float() / lam if lam > 0 else torch.zeros_like(weights, dtype=torch.float)
    return torch.histc(relative.clamp(0, 1), bins=bins, min=0.0, max=1.0) / len(weights)
