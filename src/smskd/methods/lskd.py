"""KD on z-scored logits (logit standardization)."""

from __future__ import annotations

import math

from torch import Tensor

from smskd.methods.base import DistillMethod, Outputs
from smskd.methods.functional import soft_kl
from smskd.methods.registry import register_method

STD_FLOOR = 1e-2
"""Standard deviation (in logit units) below which a row of logits counts as constant."""


def zscore(logits: Tensor, floor: float = STD_FLOOR) -> Tensor:
    """Each row minus its mean, over ``max(σ, floor)`` with σ its standard deviation (1/K).

    Exact for σ ≥ ``floor``. The exact gradient grows like 1/σ, so a (near-)constant row
    would amplify it without bound (the official code adds 10⁻⁷ to σ: ~10⁷); the floor
    caps it at the level of a row with σ = 0.01, and a constant row maps to zeros.
    Freshly initialized zoo students (resnet8x4, resnet20, vgg8; noise inputs) have
    σ ≥ 0.09. The row is shifted by its max and divided by its range before squaring,
    so logits of any finite size give no overflow (σ² of 10²⁰ would be inf in float32).
    """
    shifted = logits - logits.amax(dim=1, keepdim=True)  # in [−range, 0]
    scale = (-shifted.amin(dim=1, keepdim=True)).clamp_min(floor)  # σ ≤ range
    unit = shifted / scale
    unit = unit - unit.mean(dim=1, keepdim=True)
    std = unit.norm(dim=1, keepdim=True) / math.sqrt(logits.shape[1])  # σ/scale; 0 → grad 0
    return unit / std.clamp_min(floor / scale)


@register_method
class LSKD(DistillMethod):
    """KD with logit standardization (Sun et al., CVPR 2024, arXiv:2403.01427).

    Per sample: ``τ² · KL(softmax(Z(t)/τ) ‖ softmax(Z(s)/τ))`` with
    ``Z(z) = (z − mean(z)) / σ(z)`` over the classes of one sample — the effective
    temperature is τ·σ(z), each model's own — so the student matches the teacher's
    logit *relations*, not their range: any ``s = a·t + b`` (a > 0) gives zero loss.

    CE WEIGHT: ``methods: [lskd]`` keeps the stage's default ``ce_weight: 1`` and trains
    CE·1 + 9·LSKD. The official recipe is CE·0.1 + 9·LSKD; set ``ce_weight: 0.1`` to
    reproduce it.

    Defaults: base temperature τ = 2 and stage weight 9, the "KD + Ours" CIFAR-100
    command of the official code (sunshangquan/logit-standardization-KD: ``--base-temp 2
    --kd-weight 9``, on mdistiller's KD config whose CE weight is 0.1). Its per-pair logs
    use τ ∈ {2, 3, 4} and weights 1–12.

    Deviations from the official code, following the paper: σ is the population
    standard deviation (1/K), where the code calls ``Tensor.std`` (1/(K−1)) and adds
    10⁻⁷ to σ; for K = 100 the two differ by a factor √(99/100) on the temperature.
    Numerical: σ is floored at ``STD_FLOOR`` = 0.01 (see :func:`zscore`), which changes
    nothing for rows with σ ≥ 0.01.
    """

    name = "lskd"
    family = "response"
    citation = "Sun et al., Logit Standardization in Knowledge Distillation, CVPR 2024"
    default_weight = 9.0

    def __init__(self, temperature: float = 2.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = temperature

    def loss(self, out: Outputs) -> Tensor:
        s = zscore(out.student_logits.float())
        t = zscore(out.teacher_logits.float())
        return soft_kl(s, t, self.temperature)
