"""lm-kd, lm-hidden and lm-attention against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from smskd.errors import UserError
from smskd.methods.base import Outputs, StageContext
from smskd.methods.lm_attention import LMAttention
from smskd.methods.lm_hidden import LMHidden
from smskd.methods.lm_kd import LMKD
from smskd.methods.registry import build_method, describe_methods, validate_options
from smskd.models.taps import ModelLayout

CONTEXT = StageContext(epochs=1, num_samples=8, num_classes=3)


def outputs(
    student: dict | None = None,
    teacher: dict | None = None,
    mask: torch.Tensor | None = None,
    s_logits: torch.Tensor | None = None,
    t_logits: torch.Tensor | None = None,
) -> Outputs:
    s_logits = torch.zeros(2, 3) if s_logits is None else s_logits
    return Outputs(
        student_logits=s_logits,
        teacher_logits=torch.zeros_like(s_logits) if t_logits is None else t_logits,
        labels=torch.zeros(len(s_logits), dtype=torch.long),
        student_features=student or {},
        teacher_features=teacher or {},
        token_mask=mask,
    )


# Plain-Python probability helpers: the expected values do not go through the code under test.
def softmax(values: list[float], tau: float = 1.0) -> list[float]:
    e = [math.exp(v / tau) for v in values]
    return [x / sum(e) for x in e]


def kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def mix(w: float, a: list[float], b: list[float]) -> list[float]:
    return [w * x + (1 - w) * y for x, y in zip(a, b, strict=True)]


# --------------------------------------------------------------------------- lm-kd

# Two tokens, a three-word vocabulary.
S_LOGITS = [[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]]
T_LOGITS = [[0.0, 1.0, 0.5], [2.0, -1.0, 0.0]]


def expected_divergence(divergence: str, p: list[float], q: list[float], a: float, b: float):
    return {
        "forward": lambda: kl(p, q),
        "reverse": lambda: kl(q, p),
        "skew_forward": lambda: kl(p, mix(a, p, q)),
        "skew_reverse": lambda: kl(q, mix(a, q, p)),
        "jsd": lambda: b * kl(p, mix(b, p, q)) + (1 - b) * kl(q, mix(b, p, q)),
    }[divergence]()


@pytest.mark.parametrize(
    "divergence", ["forward", "reverse", "skew_forward", "skew_reverse", "jsd"]
)
@pytest.mark.parametrize(("tau", "skew", "beta"), [(1.0, 0.1, 0.5), (2.0, 0.3, 0.2)])
def test_lm_kd_by_hand(divergence: str, tau: float, skew: float, beta: float) -> None:
    method = LMKD(divergence=divergence, temperature=tau, skew=skew, beta=beta)
    loss = method.loss(outputs(s_logits=torch.tensor(S_LOGITS), t_logits=torch.tensor(T_LOGITS)))
    assert loss.shape == (2,)
    for i in range(2):
        p, q = softmax(T_LOGITS[i], tau), softmax(S_LOGITS[i], tau)
        expected = tau**2 * expected_divergence(divergence, p, q, skew, beta)
        assert loss[i].item() == pytest.approx(expected, rel=1e-5)


def test_lm_kd_forward_two_words_closed_form() -> None:
    # p = (½, ½) from equal teacher logits, q = softmax(0, ln 3) = (¼, ¾):
    # KL(p‖q) = ½·ln 2 + ½·ln(2/3) = ½·ln(4/3).
    s = torch.tensor([[0.0, math.log(3.0)]])
    loss = LMKD().loss(outputs(s_logits=s, t_logits=torch.zeros(1, 2)))
    assert loss.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # Skew forward, α = ½: m = (3/8, 5/8); KL(p‖m) = ½·ln(4/3) + ½·ln(4/5).
    skewed = LMKD(divergence="skew_forward", skew=0.5)
    value = skewed.loss(outputs(s_logits=s, t_logits=torch.zeros(1, 2)))
    assert value.item() == pytest.approx(0.5 * math.log(4 / 3) + 0.5 * math.log(4 / 5), rel=1e-6)


@pytest.mark.parametrize(
    "divergence", ["forward", "reverse", "skew_forward", "skew_reverse", "jsd"]
)
def test_lm_kd_zero_when_equal_and_gradient_reaches_the_student_only(divergence: str) -> None:
    torch.manual_seed(0)
    t = torch.randn(4, 7)
    assert LMKD(divergence=divergence).loss(outputs(s_logits=t, t_logits=t)).abs().max() < 1e-6
    s = torch.randn(4, 7, requires_grad=True)
    t = t.clone().requires_grad_(True)  # a teacher that forgot requires_grad(False)
    LMKD(divergence=divergence, temperature=2.0).loss(
        outputs(s_logits=s, t_logits=t)
    ).sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.parametrize(
    "divergence", ["forward", "reverse", "skew_forward", "skew_reverse", "jsd"]
)
def test_lm_kd_entries_masked_out_in_both_give_no_nan(divergence: str) -> None:
    # A vocabulary entry both models mask with −inf (probability 0 on both sides) adds 0.
    s = torch.tensor([[1.0, 0.0, float("-inf")]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, float("-inf")]])
    loss = LMKD(divergence=divergence, skew=0.3, beta=0.3).loss(outputs(s_logits=s, t_logits=t))
    loss.sum().backward()
    p, q = softmax([0.0, 1.0]), softmax([1.0, 0.0])
    assert loss.item() == pytest.approx(expected_divergence(divergence, p, q, 0.3, 0.3), rel=1e-5)
    assert torch.isfinite(s.grad).all()


def test_lm_kd_options_are_checked() -> None:
    with pytest.raises(ValueError, match="divergence"):
        validate_options("lm-kd", {"divergence": "bogus"})
    assert validate_options("lm-kd", {"divergence": "jsd", "beta": 0.9}) == {
        "divergence": "jsd",
        "beta": 0.9,
    }
    with pytest.raises(ValueError, match="beta must be strictly between 0 and 1"):
        LMKD(beta=1.0)
    with pytest.raises(ValueError, match="beta must be strictly between 0 and 1"):
        LMKD(divergence="jsd", beta=0.0)
    with pytest.raises(ValueError, match="skew must be strictly between 0 and 1"):
        LMKD(skew=0.0)
    with pytest.raises(ValueError, match="temperature"):
        LMKD(temperature=0.0)
    with pytest.raises(UserError, match=r"lm-kd.*beta"):
        build_method("lm-kd", {"beta": 1.0}, ModelLayout(), ModelLayout())


# ----------------------------------------------------------------------- lm-hidden


def test_uniform_layer_map_picks_teacher_layers_2_and_4() -> None:
    method = LMHidden(["s1", "s2"], ["t1", "t2", "t3", "t4"])
    assert method.teacher_taps() == ["t2", "t4"]
    assert method.student_taps() == ["s1", "s2"]
    # N not a multiple of M: ⌊m·N/M⌋ = ⌊4/3⌋, ⌊8/3⌋, 4 = 1, 2, 4.
    assert LMHidden(["a", "b", "c"], ["t1", "t2", "t3", "t4"]).teacher_taps() == ["t1", "t2", "t4"]
    # Defaults from the layouts: every student and every teacher layer, then mapped.
    student = ModelLayout(features=("hidden.0", "hidden.1"))
    teacher = ModelLayout(features=tuple(f"hidden.{i}" for i in range(4)))
    built = build_method("lm-hidden", {}, student, teacher)
    assert built.teacher_taps() == ["hidden.1", "hidden.3"]


def test_layer_map_errors() -> None:
    with pytest.raises(ValueError, match=r"uniform layer_map.*explicit"):
        LMHidden(["a", "b", "c"], ["x", "y"])
    with pytest.raises(ValueError, match="explicit layer_map pairs them in order"):
        LMHidden(["a", "b"], ["x", "y", "z"], layer_map="explicit")
    with pytest.raises(ValueError, match="layer_map"):
        validate_options("lm-hidden", {"layer_map": "random"})
    explicit = LMHidden(["a", "b"], ["z", "x"], layer_map="explicit")
    assert explicit.teacher_taps() == ["z", "x"]


def test_lm_hidden_by_hand_per_token() -> None:
    # One sequence of two tokens, two layer pairs of width 2 (identity projections).
    # Pair 1: token 0 (1, 2) vs (1, 0) → (0 + 4)/2 = 2; token 1 (3, 4) vs (0, 0) → 25/2.
    # Pair 2: token 0 (0, 0) vs (1, 1) → 1;           token 1 (1, 1) vs (1, 1) → 0.
    # Mean over pairs: token 0 → 1.5, token 1 → 6.25.
    s1, t1 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    s2, t2 = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]]), torch.ones(1, 2, 2)
    out = outputs({"s1": s1, "s2": s2}, {"t1": t1, "t2": t2}, mask=torch.ones(1, 2, dtype=bool))
    method = LMHidden(["s1", "s2"], ["t1", "t2"], layer_map="explicit")
    method.setup(out, CONTEXT)
    assert all(isinstance(p, nn.Identity) for p in method.projections)
    assert list(method.parameters()) == []
    assert method.loss(out).tolist() == pytest.approx([1.5, 6.25])
    # Only the second token in the loss: [N] = [1].
    out.token_mask = torch.tensor([[False, True]])
    assert method.loss(out).tolist() == pytest.approx([6.25])


def test_lm_hidden_projection_by_hand_and_its_gradient() -> None:
    # Student width 2 → teacher width 3 through W = [[1, 0], [0, 1], [1, 1]], b = 0:
    # (1, 2) → (1, 2, 3) against (1, 1, 1) → (0 + 1 + 4)/3 = 5/3.
    s = torch.tensor([[[1.0, 2.0]]], requires_grad=True)
    t = torch.ones(1, 1, 3, requires_grad=True)
    out = outputs({"s": s}, {"t": t}, mask=torch.ones(1, 1, dtype=bool))
    method = LMHidden(["s"], ["t"])
    method.setup(out, CONTEXT)
    projection = method.projections[0]
    assert isinstance(projection, nn.Linear)
    with torch.no_grad():
        projection.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        projection.bias.zero_()
    loss = method.loss(out)
    assert loss.item() == pytest.approx(5 / 3, rel=1e-6)
    loss.sum().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert t.grad is None


def test_lm_hidden_padding_changes_nothing() -> None:
    torch.manual_seed(0)
    lengths = [3, 1]
    s = [torch.randn(n, 4) for n in lengths]
    t = [torch.randn(n, 6) for n in lengths]
    method = LMHidden(["s"], ["t"])
    probe = outputs({"s": torch.zeros(1, 1, 4)}, {"t": torch.zeros(1, 1, 6)})
    method.setup(probe, CONTEXT)

    def padded(parts: list[torch.Tensor]) -> torch.Tensor:
        garbage = 1e3 * torch.randn(len(parts), 3, parts[0].shape[1])
        for i, part in enumerate(parts):
            garbage[i, : len(part)] = part
        return garbage

    mask = torch.tensor([[True, True, True], [True, False, False]])
    s_padded = padded(s).requires_grad_(True)
    loss = method.loss(outputs({"s": s_padded}, {"t": padded(t)}, mask=mask))
    alone = [
        method.loss(
            outputs({"s": si[None]}, {"t": ti[None]}, mask=torch.ones(1, len(si), dtype=bool))
        )
        for si, ti in zip(s, t, strict=True)
    ]
    assert loss.shape == (4,)
    assert torch.allclose(loss, torch.cat(alone), rtol=1e-6)
    loss.mean().backward()
    assert s_padded.grad[~mask].abs().max() == 0  # the padding is in no gradient either


def test_lm_hidden_vectors_without_mask_are_one_token_per_sample() -> None:
    s, t = torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    method = LMHidden(["s"], ["t"])
    out = outputs({"s": s}, {"t": t})
    method.setup(out, CONTEXT)
    assert method.loss(out).tolist() == pytest.approx([2.0, 4.0])


def test_lm_hidden_refuses_feature_maps() -> None:
    method = LMHidden(["s"], ["t"])
    out = outputs({"s": torch.ones(2, 3, 4, 4)}, {"t": torch.ones(2, 3, 4, 4)})
    with pytest.raises(UserError, match=r"'s'.*'t'.*student_layers/teacher_layers"):
        method.setup(out, CONTEXT)


# -------------------------------------------------------------------- lm-attention


def causal_attention(scores: torch.Tensor) -> torch.Tensor:
    """Causal softmax over the last axis of ``[B, H, T, T]`` scores (exact zeros above)."""
    t = scores.shape[-1]
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(dim=-1)


def attention_only(**options) -> LMAttention:
    return LMAttention("sa", "ta", "sv", "tv", value_weight=0.0, **options)


def values_only(**options) -> LMAttention:
    return LMAttention("sa", "ta", "sv", "tv", attention_weight=0.0, **options)


def test_attention_transfer_by_hand() -> None:
    # [1, 1, 2, 2]: row 0 is (1, 0) on both sides → 0; row 1 teacher (½, ½), student (¼, ¾):
    # KL = ½·ln(½/¼) + ½·ln(½/¾) = ½·ln(4/3).
    a_t = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    a_s = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])
    out = outputs({"sa": a_s}, {"ta": a_t}, mask=torch.ones(1, 2, dtype=bool))
    method = attention_only()
    method.setup(out, CONTEXT)
    assert method.loss(out).tolist() == pytest.approx([0.0, 0.5 * math.log(4 / 3)], abs=1e-7)
    # attention_weight scales the term.
    doubled = attention_only(attention_weight=2.0).loss(out)
    assert doubled.tolist() == pytest.approx([0.0, math.log(4 / 3)], abs=1e-7)


def test_attention_kl_is_zero_for_equal_maps_and_finite_with_causal_zeros() -> None:
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 5, 5, requires_grad=True)
    a_s = causal_attention(scores)
    a_t = causal_attention(torch.randn(2, 3, 5, 5))
    assert (a_s[..., 0, 1:] == 0).all()  # the zeros the KL must skip
    mask = torch.ones(2, 5, dtype=bool)
    method = attention_only()
    same = method.loss(outputs({"sa": a_t}, {"ta": a_t}, mask=mask))
    assert same.abs().max() < 1e-6
    loss = method.loss(outputs({"sa": a_s}, {"ta": a_t}, mask=mask))
    assert torch.isfinite(loss).all() and (loss[1:] > 0).any()
    loss.mean().backward()
    assert torch.isfinite(scores.grad).all() and scores.grad.abs().sum() > 0


def test_value_relation_by_hand() -> None:
    # [1, 1, 2, 2]: one head, two tokens, head_dim 2; scale 1/√2; row i over keys 0..i.
    # Teacher V = (1, 0), (0, 1): row 1 scores (0, 1)/√2. Student V = (1, 0), (2, 1): row 1
    # scores (2, 5)/√2. Row 0 has the single key 0 on both sides → 0.
    v_t = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    v_s = torch.tensor([[[[1.0, 0.0], [2.0, 1.0]]]], requires_grad=True)
    r = 1 / math.sqrt(2)
    expected = kl(softmax([0.0, r]), softmax([2 * r, 5 * r]))
    assert expected > 0.1
    out = outputs({"sv": v_s}, {"tv": v_t}, mask=torch.ones(1, 2, dtype=bool))
    method = values_only()
    method.setup(out, CONTEXT)
    loss = method.loss(out)
    assert loss.tolist() == pytest.approx([0.0, expected], abs=1e-7)
    loss.sum().backward()
    assert v_s.grad is not None and torch.isfinite(v_s.grad).all() and v_s.grad.abs().sum() > 0
    # Both terms: the sum of the two, each weighted.
    a = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    a_s = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])
    both = LMAttention("sa", "ta", "sv", "tv", attention_weight=2.0, value_weight=3.0)
    out = outputs({"sa": a_s, "sv": v_s}, {"ta": a, "tv": v_t}, mask=torch.ones(1, 2, dtype=bool))
    total = both.loss(out)
    assert total[1].item() == pytest.approx(2 * 0.5 * math.log(4 / 3) + 3 * expected, rel=1e-6)


def test_relation_heads_resplit_the_concatenated_heads() -> None:
    torch.manual_seed(0)
    # Two heads of head_dim 1: per token the concatenation is (head 0, head 1).
    heads = torch.randn(1, 2, 3, 1)
    concatenated = torch.cat([heads[:, 0], heads[:, 1]], dim=-1)[:, None]  # [1, 1, 3, 2]
    teacher = torch.randn(1, 1, 3, 2)
    mask = torch.ones(1, 3, dtype=bool)
    # relation_heads 1: the student's two heads become one head of width 2.
    method = values_only(relation_heads=1)
    out = outputs({"sv": heads}, {"tv": teacher}, mask=mask)
    method.setup(out, CONTEXT)
    as_one = values_only().loss(outputs({"sv": concatenated}, {"tv": teacher}, mask=mask))
    assert torch.allclose(method.loss(out), as_one, atol=1e-7)
    # relation_heads 2 cuts the width-2 head back into the two original heads.
    two = values_only(relation_heads=2).loss(
        outputs({"sv": concatenated}, {"tv": heads}, mask=mask)
    )
    assert two.abs().max() < 1e-6
    # Unequal head counts without relation_heads are refused, naming the fix.
    with pytest.raises(UserError, match="2 heads against 1; set relation_heads"):
        values_only().setup(out, CONTEXT)
    with pytest.raises(UserError, match="relation_heads 3 does not divide"):
        values_only(relation_heads=3).setup(out, CONTEXT)


def test_attention_head_mismatch_names_the_fix() -> None:
    a_s, a_t = causal_attention(torch.zeros(1, 2, 3, 3)), causal_attention(torch.zeros(1, 4, 3, 3))
    out = outputs({"sa": a_s}, {"ta": a_t}, mask=torch.ones(1, 3, dtype=bool))
    with pytest.raises(UserError, match=r"2 heads against 4.*attention_weight: 0.*relation_heads"):
        attention_only().setup(out, CONTEXT)


def test_lm_attention_padding_changes_nothing() -> None:
    torch.manual_seed(0)
    lengths, width = [4, 2], 5  # right padding to 5 positions
    parts = [
        {
            "sa": causal_attention(torch.randn(1, 2, n, n)),
            "ta": causal_attention(torch.randn(1, 2, n, n)),
            "sv": torch.randn(1, 2, n, 3),
            "tv": torch.randn(1, 2, n, 4),
        }
        for n in lengths
    ]
    padded: dict[str, torch.Tensor] = {}
    for key in ("sa", "ta"):  # padded rows: any causal distribution; valid rows: exact 0 beyond
        full = causal_attention(1e2 * torch.randn(2, 2, width, width))
        for i, part in enumerate(parts):
            n = lengths[i]
            full[i, :, :n, :] = 0.0
            full[i, :, :n, :n] = part[key][0]
        padded[key] = full
    for key, d in (("sv", 3), ("tv", 4)):
        full = 1e3 * torch.randn(2, 2, width, d)  # garbage at padded positions
        for i, part in enumerate(parts):
            full[i, :, : lengths[i]] = part[key][0]
        padded[key] = full
    mask = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    method = LMAttention("sa", "ta", "sv", "tv")
    out = outputs({k: padded[k] for k in ("sa", "sv")}, {k: padded[k] for k in ("ta", "tv")}, mask)
    method.setup(out, CONTEXT)
    loss = method.loss(out)
    alone = [
        method.loss(
            outputs(
                {k: p[k] for k in ("sa", "sv")},
                {k: p[k] for k in ("ta", "tv")},
                torch.ones(1, n, dtype=bool),
            )
        )
        for p, n in zip(parts, lengths, strict=True)
    ]
    assert loss.shape == (sum(lengths),)
    assert torch.isfinite(loss).all()
    assert torch.allclose(loss, torch.cat(alone), rtol=1e-5, atol=1e-7)


def test_lm_attention_gradients_reach_the_student_only() -> None:
    torch.manual_seed(0)
    scores = torch.randn(2, 2, 4, 4, requires_grad=True)
    v_s = torch.randn(2, 2, 4, 3, requires_grad=True)
    a_t = causal_attention(torch.randn(2, 2, 4, 4)).requires_grad_(True)
    v_t = torch.randn(2, 2, 4, 3, requires_grad=True)
    out = outputs(
        {"sa": causal_attention(scores), "sv": v_s},
        {"ta": a_t, "tv": v_t},
        mask=torch.tensor([[True] * 4, [True, True, False, False]]),
    )
    LMAttention("sa", "ta", "sv", "tv").loss(out).mean().backward()
    for grad in (scores.grad, v_s.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert a_t.grad is None and v_t.grad is None


def test_lm_attention_taps_defaults_and_options() -> None:
    layout = ModelLayout(
        features=("hidden.0", "hidden.1"),
        attention=("attention.0", "attention.1"),
        values=("values.0", "values.1"),
    )
    built = build_method("lm-attention", {}, layout, layout)
    assert built.student_taps() == ["attention.1", "values.1"]
    assert built.teacher_taps() == ["attention.1", "values.1"]
    only_values = build_method("lm-attention", {"attention_weight": 0.0}, layout, layout)
    assert only_values.student_taps() == ["values.1"]
    only_attention = LMAttention(["a0", "a1"], ["b0", "b1"], "v", "w", value_weight=0.0)
    assert only_attention.student_taps() == ["a0", "a1"]
    assert only_attention.teacher_taps() == ["b0", "b1"]
    with pytest.raises(ValueError, match="both 0"):
        LMAttention("a", "b", "v", "w", attention_weight=0.0, value_weight=0.0)
    with pytest.raises(ValueError, match="paired in order"):
        LMAttention(["a0", "a1"], ["b0"], "v", "w")
    with pytest.raises(ValueError, match="relation_heads"):
        LMAttention("a", "b", "v", "w", relation_heads=0)
    with pytest.raises(ValueError, match="relation_heads"):
        validate_options("lm-attention", {"relation_heads": 1.5})


# ------------------------------------------------------------------------ registry


def test_the_lm_methods_are_registered() -> None:
    rows = {row["name"]: row for row in describe_methods()}
    assert rows["lm-kd"]["family"] == "response"
    assert rows["lm-hidden"]["family"] == "feature"
    assert rows["lm-attention"]["family"] == "feature"
    assert rows["lm-kd"]["taps"] == "logits"
    assert rows["lm-hidden"]["helpers"] != "none"
    assert "last_attention" in rows["lm-attention"]["taps"]
