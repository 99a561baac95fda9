"""Factor transfer: match normalized factors of a paraphraser and a translator."""

from __future__ import annotations

from itertools import pairwise
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from smskd.errors import UserError
from smskd.methods.base import DistillMethod, Outputs, StageContext
from smskd.methods.registry import register_method


def _conv_stack(channels: list[int], batch_norm: bool, transpose: bool = False) -> nn.Sequential:
    """3×3, stride-1 (transposed) convolutions, each followed by [BN and] LeakyReLU(0.1)."""
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in pairwise(channels):
        layers.append(conv(c_in, c_out, 3, stride=1, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


@register_method
class FT(DistillMethod):
    """Factor transfer (Kim, Park & Kwak, NeurIPS 2018, arXiv:1802.04977).

    A paraphraser (encoder ``C_t → C_t → m → m``, decoder ``m → m → C_t → C_t``, 3×3
    convolutions with LeakyReLU 0.1, ``m = round(k·C_t)`` with paraphrase rate k = 0.5)
    autoencodes the teacher's last feature map; its code is the teacher factor F_T.
    A translator (``C_s → C_s → m → m``, same layers) turns the student's last feature
    map into the student factor F_S. Per sample::

        L_FT = mean_j | F_S/‖F_S‖₂ − F_T/‖F_T‖₂ |_j     (p = 1, factors flattened)

    Each factor is flattened over all its m·H·W elements and normalized as a whole, as
    in the paper and the authors' code (``F.normalize(x.view(B, -1))``). The paper
    writes ``‖·‖₁``; the authors' code (``nn.L1Loss``) averages over the factor's
    elements instead, which is what its β was tuned for, so we average too. Teacher and
    student maps must have the same spatial size.

    Default weight β = 500: the authors' CIFAR-10 setting (``--beta 500`` in
    Jangho-Kim/Factor-Transfer-pytorch). Caveat: it is the only published β for this
    formulation and was tuned on CIFAR-10 alone. RepDistiller's ``-b 200`` does not carry
    over: its FT loss compares a different factor, ``normalize(mean_c F²)``, an
    attention-like H·W map, not the flattened factor used here.

    Deviation 1 (paraphraser training): the paper pre-trains the paraphraser with the
    reconstruction loss ``‖x − P(x)‖²`` and then keeps it fixed (the authors' code
    pre-trains with an L1 loss; RepDistiller with MSE at lr 0.01, then freezes it in
    eval mode). A stage has no separate phase, so here the paraphraser learns the
    reconstruction (per-sample MSE against the gradient-free teacher map) *during* the
    stage, and early in a stage the student chases a factor that is still moving. F_T is
    detached, so the factor loss never moves the paraphraser; only the reconstruction
    does. The stage multiplies the whole method by β, so the reconstruction is scaled by
    ``reconstruction_weight`` = 1/500: at the default β the paraphraser takes plain MSE
    gradient steps at the stage's learning rate (set it to 1/β if you change β). It
    enters as ``w·(rec − rec.detach())``: the paraphraser gets its gradient but the
    value is unchanged, so the logged loss is L_FT alone.

    Deviation 2 (ours, in neither reference): BatchNorm after every convolution of the
    paraphraser and the translator (``batch_norm``). The authors' code has none (its BN
    layers are commented out); RepDistiller's ``Paraphraser`` defaults to
    ``use_bn=False`` and only its ``Translator`` has BN. We add it because, trained
    concurrently by the stage's SGD, the BN-free autoencoder stayed at the mean
    reconstruction for hundreds of steps (digits, 10 epochs: MSE 0.83 against a variance
    of 0.84; with BN 0.24), so the factors it handed the student carried no per-sample
    information. ``batch_norm: false`` gives the authors' layers.

    With BN, a training batch of one sample on 1×1 maps (a loader's short last batch)
    leaves BN a single value per channel, which it refuses; such a batch contributes a
    zero loss (no gradient) instead of stopping the run.
    """

    name = "ft"
    family = "feature"
    citation = (
        "Kim, Park & Kwak, Paraphrasing Complex Network: Network Compression via "
        "Factor Transfer, NeurIPS 2018"
    )
    helpers = "paraphraser (conv autoencoder on the teacher map), translator (3 convs)"
    default_weight = 500.0
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_layer": ("student", "last_feature"),
        "teacher_layer": ("teacher", "last_feature"),
    }

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        rate: float = 0.5,
        reconstruction_weight: float = 1 / 500,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < rate <= 1:
            raise ValueError("rate (the paraphrase rate k) must be in (0, 1]")
        if reconstruction_weight < 0:
            raise ValueError("reconstruction_weight must be >= 0")
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.rate = rate
        self.reconstruction_weight = reconstruction_weight
        self.batch_norm = batch_norm
        self.encoder = nn.Sequential()
        self.decoder = nn.Sequential()
        self.translator = nn.Sequential()

    def setup(self, probe: Outputs, context: StageContext) -> None:
        s = probe.student_features[self.student_layer]
        t = probe.teacher_features[self.teacher_layer]
        if s.dim() != 4 or t.dim() != 4 or s.shape[2:] != t.shape[2:]:
            raise UserError(
                f"ft: student {self.student_layer!r} gives {tuple(s.shape[1:])} and teacher "
                f"{self.teacher_layer!r} gives {tuple(t.shape[1:])}; factor transfer needs "
                "feature maps (C, H, W) of the same H×W: pick other layers "
                "(student_layer/teacher_layer)"
            )
        c_s, c_t = s.shape[1], t.shape[1]
        m = max(1, round(c_t * self.rate))
        self.encoder = _conv_stack([c_t, c_t, m, m], self.batch_norm)
        self.decoder = _conv_stack([m, m, c_t, c_t], self.batch_norm, transpose=True)
        self.translator = _conv_stack([c_s, c_s, m, m], self.batch_norm)
        self.to(device=s.device)

    def loss(self, out: Outputs) -> Tensor:
        t = out.teacher_features[self.teacher_layer]
        s = out.student_features[self.student_layer]
        if self.training and self.batch_norm and t.shape[0] * t.shape[2] * t.shape[3] == 1:
            return s.float().flatten(1).sum(dim=1) * 0.0  # zero, yet on the student's graph
        factor_t = self.encoder(t)
        reconstruction = (self.decoder(factor_t).float() - t.float()).pow(2).flatten(1).mean(1)
        factor_s = self.translator(s)
        f_s = F.normalize(factor_s.float().flatten(1), dim=1)
        f_t = F.normalize(factor_t.detach().float().flatten(1), dim=1)
        transfer = (f_s - f_t).abs().mean(dim=1)
        return transfer + self.reconstruction_weight * (reconstruction - reconstruction.detach())
