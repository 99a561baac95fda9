"""Contrastive representation distillation: NCE against memory banks of embeddings."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from smskd.errors import UserError
from smskd.methods.base import DistillMethod, Outputs, StageContext, check_width
from smskd.methods.registry import register_method


@register_method
class CRD(DistillMethod):
    """Contrastive Representation Distillation (Tian, Krishnan & Isola, ICLR 2020,
    arXiv:1910.10699), as in the official code (HobbitLong/RepDistiller, ``crd/``).

    The penultimate embeddings (default: the classifier's input) go through learnable
    linear maps ``g_S``, ``g_T`` to ``feat_dim`` = 128 and are L2-normalized: ``v_s``,
    ``v_t``. Two memory banks ``M_S``, ``M_T`` (``num_samples × feat_dim`` buffers) hold
    every training sample's embedding. For sample ``i`` with K negatives ``j_1..j_K``
    drawn from the other samples, ``P(v, m) = exp(v·m/τ)/Z`` and ``c = K/N`` (K noise
    draws of probability 1/N each, N = ``num_samples``)::

        NCE(v, M) = −log P(v,M_i)/(P(v,M_i) + c) − Σ_k log c/(P(v,M_jk) + c)
        L_i = NCE(v_s, M_T) + NCE(v_t, M_S)

    The memory rows are constants (no gradient); the second term trains only ``g_T``.
    After the loss, under ``no_grad`` and only in training mode, rows ``i`` move to
    ``normalize(m·M_i + (1 − m)·v_i)`` with momentum m = 0.5. ``Z`` (one per term) is
    set once, on the first training batch, to ``N · mean exp(v·m/τ)`` over its
    positives and negatives, and kept so a resumed run uses the same constant; it is
    stored as ``log Z`` in the ``log_z`` buffer (NaN until set) and the loss is computed
    in log space, because ``exp(v·m/τ)`` overflows float32 for τ ≲ 0.011. The paper's
    critic writes ``h`` without ``Z``; the official code (following Wu et al. 2018)
    divides by it, and so do we. Defaults K = 16384, τ = 0.07, m = 0.5, feat_dim = 128
    are the official ones; K is clamped to N − 1 for small training sets. The loss is a
    sum over the positive and the K negatives of each sample, so it is per sample
    (shape ``[B]``); its batch mean equals the official ``s_loss + t_loss``. Default
    weight β = 0.8, the CRD weight (``-b 0.8``) of RepDistiller's CIFAR-100 scripts,
    both alone and with KD.

    Deviations from the official code. Negatives are drawn uniformly with replacement
    from the N − 1 *other* samples with torch's global RNG (reproducible and
    resumable). The official CIFAR loader draws them (without replacement when it can)
    from samples of *other classes* only; that needs every label up front and belongs
    in a data loader, not in a loss. This changes the objective: about 1/C of our
    negatives share the anchor's class (≈ 1% on CIFAR-100, ≈ 10% on a 10-class set)
    and are pushed away although the official code never does so, which may matter
    on few-class data. The memory banks are L2-normalized at initialization (the
    official uniform rows have norm ≈ 1 only on average). The NCE terms are evaluated
    as softplus of log-ratios, so the official ε = 1e-7 in the denominators is not
    needed. One host sync per step checks the sample indices, so that a bad index is a
    readable error, not a CUDA assert.
    """

    name = "crd"
    family = "relation"
    citation = "Tian et al., Contrastive Representation Distillation, ICLR 2020"
    helpers = "linear embeddings (student, teacher) → feat_dim; memory banks (buffers)"
    default_weight = 0.8
    needs_index = True
    tap_roles: ClassVar[dict[str, tuple[str, str]]] = {
        "student_layer": ("student", "embedding"),
        "teacher_layer": ("teacher", "embedding"),
    }

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str,
        feat_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
    ) -> None:
        super().__init__()
        if feat_dim < 1 or num_negatives < 1:
            raise ValueError("feat_dim and num_negatives must be >= 1")
        check_width("feat_dim", feat_dim)
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        if not 0 <= momentum < 1:
            raise ValueError("momentum must be in [0, 1)")
        self.student_layer = student_layer
        self.teacher_layer = teacher_layer
        self.feat_dim = feat_dim
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.momentum = momentum
        self.k = num_negatives  # clamped to num_samples − 1 in setup()

    def batch_memory(self, batch_size: int, probe: Outputs, context: StageContext) -> int:
        n = context.num_samples
        if n is None or n < 2:
            return 0  # setup() refuses these with their own message
        # float32: the two memory banks, and per term the B×(K+1) bank rows gathered
        # for the batch (kept for backward) plus ~6 B×(K+1) logit-sized tensors (measured).
        rows = batch_size * (min(self.num_negatives, n - 1) + 1)
        return 4 * (2 * n * self.feat_dim + 2 * rows * self.feat_dim + 12 * rows)

    def setup(self, probe: Outputs, context: StageContext) -> None:
        n = context.num_samples
        if n is None:
            raise UserError(
                "crd needs the training-set size for its memory banks: give a training "
                "loader whose dataset has a len()"
            )
        if n < 2:
            raise UserError(f"crd needs at least 2 training samples for negatives, got {n}")
        self.k = min(self.num_negatives, n - 1)
        s = probe.student_features[self.student_layer].flatten(1)
        t = probe.teacher_features[self.teacher_layer].flatten(1)
        device = s.device
        self.embed_s = nn.Linear(s.shape[1], self.feat_dim).to(device)
        self.embed_t = nn.Linear(t.shape[1], self.feat_dim).to(device)
        # Uniform rows as in the official code; its scale 1/sqrt(d/3) vanishes in the norm.
        for bank in ("memory_s", "memory_t"):
            rows = torch.rand(n, self.feat_dim, device=device) * 2 - 1
            self.register_buffer(bank, F.normalize(rows, dim=1))
        # log Z for the student-anchor and the teacher-anchor term; NaN means "not yet set".
        self.register_buffer("log_z", torch.full((2,), float("nan"), device=device))

    def sample_negatives(self, index: Tensor) -> Tensor:
        """``[B, K]`` indices, uniform over the N − 1 positions other than each ``index``."""
        draw = torch.randint(0, len(self.memory_s) - 1, (len(index), self.k), device=index.device)
        return draw + (draw >= index.unsqueeze(1)).long()  # skip the positive itself

    def loss(self, out: Outputs) -> Tensor:
        index = self._checked_index(out.index)
        s = out.student_features[self.student_layer].flatten(1).float()
        t = out.teacher_features[self.teacher_layer].flatten(1).float()
        v_s = F.normalize(self.embed_s(s).float(), dim=1)
        v_t = F.normalize(self.embed_t(t).float(), dim=1)
        candidates = torch.cat([index.unsqueeze(1), self.sample_negatives(index)], dim=1)
        loss = self._nce(v_s, self.memory_t, candidates, 0) + self._nce(
            v_t, self.memory_s, candidates, 1
        )
        if self.training:
            with torch.no_grad():
                # Under DDP every rank applies every rank's update: the banks stay equal.
                index = _all_gather_cat(index)
                for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                    v = _all_gather_cat(v.detach())
                    mixed = self.momentum * bank[index] + (1 - self.momentum) * v
                    bank.index_copy_(0, index, F.normalize(mixed, dim=1))
        return loss

    def _nce(self, anchor: Tensor, bank: Tensor, candidates: Tensor, slot: int) -> Tensor:
        """Per-sample NCE of ``anchor`` against bank rows ``candidates`` (positive first)."""
        logits = torch.einsum("bkd,bd->bk", bank[candidates], anchor) / self.temperature
        n = len(bank)
        # log(N · mean exp(logits)), never forming exp(logits).
        fresh = torch.logsumexp(logits.detach().flatten(), 0) + math.log(n / logits.numel())
        if self.training:  # under DDP: the estimate over all ranks' batches, equal everywhere
            estimates = _all_gather_cat(fresh.view(1))
            fresh = torch.logsumexp(estimates, 0) - math.log(len(estimates))
        # torch.where, not `if isnan`: no host sync. Outside training Z is used, not set.
        log_z = torch.where(self.log_z[slot].isnan(), fresh, self.log_z[slot])
        if self.training:
            self.log_z[slot] = log_z
        log_p = logits - log_z
        log_c = math.log(self.k / n)
        # −log P/(P + c) = softplus(log c − log P);  −log c/(P + c) = softplus(log P − log c).
        return F.softplus(log_c - log_p[:, 0]) + F.softplus(log_p[:, 1:] - log_c).sum(dim=1)

    def _checked_index(self, index: Tensor | None) -> Tensor:
        if index is None:
            raise UserError(
                "crd needs each sample's dataset index: make the training loader yield "
                "(inputs, labels, index)"
            )
        n = len(self.memory_s)
        bad = (index < 0) | (index >= n)
        if bad.any():
            raise UserError(
                f"crd: sample index {int(index[bad][0])} is outside the memory banks "
                f"[0, {n}); the loader's index must be the position in the training set"
            )
        return index.long()


def _all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (equal shapes on all ranks)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)
