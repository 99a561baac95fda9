"""KD on z-scored logits (logit standardization)."""

from __future__ import annotations

from torch import Tensor

from smskd.methods.base import DistillMethod, Outputs
from smskd.methods.kd import soft_kl


def zscore(logits: Tensor, eps: float = 1e-12) -> Tensor:
    """Each row minus its mean, over its standard deviation (1/K, as the paper's σ).

    ``eps`` sits under the square root: a constant row maps to zeros with a finite
    gradient, where ``torch.std``'s backward would give NaN.
    """
    centered = logits - logits.mean(dim=1, keepdim=True)
    return centered / (centered.pow(2).mean(dim=1, keepdim=True) + eps).sqrt()


class LSKD(DistillMethod):
    """KD with logit standardization (Sun et al., CVPR 2024, arXiv:2403.01427).

    Per sample: ``τ² · KL(softmax(Z(t)/τ) ‖ softmax(Z(s)/τ))`` with
    ``Z(z) = (z − mean(z)) / σ(z)`` over the classes of one sample — the effective
    temperature is τ·σ(z), each model's own — so the student matches the teacher's
    logit *relations*, not their range: any ``s = a·t + b`` (a > 0) gives zero loss.

    Defaults: base temperature τ = 2 and stage weight 9, the "KD + Ours" CIFAR-100
    command of the official code (sunshangquan/logit-standardization-KD: ``--base-temp 2
    --kd-weight 9``; its CE weight is mdistiller's KD value 0.1, so set ``ce_weight:
    0.1`` to reproduce it). Its per-pair logs use τ ∈ {2, 3, 4} and weights 1–12.

    Deviation from the official code, following the paper: σ is the population
    standard deviation (1/K), where the code calls ``Tensor.std`` (1/(K−1)) and adds
    10⁻⁷ to σ; for K = 100 the two differ by a factor √(99/100) on the temperature.
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
