"""CRD: NCE loss, Z and memory updates against values computed by hand; runs in a stage."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import smskd.methods.registry
from smskd.config import Stage
from smskd.errors import UserError
from smskd.methods import Outputs, StageContext
from smskd.methods.crd import CRD
from smskd.train.stages import run_stages


def outputs(s: torch.Tensor, t: torch.Tensor, index: torch.Tensor | None) -> Outputs:
    logits = torch.zeros(len(s), 3)
    return Outputs(
        student_logits=logits,
        teacher_logits=logits,
        labels=torch.zeros(len(s), dtype=torch.long),
        student_features={"s": s},
        teacher_features={"t": t},
        index=index,
    )


R = 1 / math.sqrt(2)
# Teacher memory: the four axis directions; student memory: four unit vectors.
MEMORY_T = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]
MEMORY_S = [[0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [-0.8, 0.6]]
STUDENT = [[3.0, 4.0], [1.0, 0.0]]  # normalized: (0.6, 0.8), (1, 0)
TEACHER = [[0.0, 2.0], [1.0, 1.0]]  # normalized: (0, 1), (r, r)
INDEX = [0, 2]
NEGATIVES = [[1, 3], [0, 1]]


def hand_method(temperature: float = 0.5) -> CRD:
    """N = 4, feat_dim = 2, K = 2; identity embeddings; fixed memories and negatives."""
    method = CRD("s", "t", feat_dim=2, num_negatives=2, temperature=temperature)
    probe = outputs(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(INDEX))
    method.setup(probe, StageContext(epochs=1, num_samples=4))
    with torch.no_grad():
        for embed in (method.embed_s, method.embed_t):
            embed.weight.copy_(torch.eye(2))
            embed.bias.zero_()
        method.memory_t.copy_(torch.tensor(MEMORY_T))
        method.memory_s.copy_(torch.tensor(MEMORY_S))
    method.sample_negatives = lambda index: torch.tensor(NEGATIVES)  # type: ignore[method-assign]
    return method


def hand_nce(dots: list[float], z: float, c: float, tau: float) -> float:
    """−log P₀/(P₀ + c) − Σ_k log c/(P_k + c) with P = exp(dot/τ)/Z."""
    p = [math.exp(d / tau) / z for d in dots]
    return -math.log(p[0] / (p[0] + c)) - sum(math.log(c / (pk + c)) for pk in p[1:])


def test_nce_loss_and_z_by_hand() -> None:
    method = hand_method()
    loss = method.loss(outputs(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(INDEX)))
    assert loss.shape == (2,)
    # Student anchor against the teacher memory rows [i, negatives]:
    #   sample 0: (0.6, 0.8)·rows 0, 1, 3 = 0.6, 0.8, −0.8
    #   sample 1: (1, 0)·rows 2, 0, 1 = −1, 1, 0
    student_dots = [[0.6, 0.8, -0.8], [-1.0, 1.0, 0.0]]
    # Teacher anchor against the student memory rows:
    #   sample 0: (0, 1)·rows 0, 1, 3 = 1, 0, 0.6
    #   sample 1: (r, r)·rows 2, 0, 1 = 1.4r, r, r
    teacher_dots = [[1.0, 0.0, 0.6], [1.4 * R, R, R]]
    tau, n, c = 0.5, 4, 2 / 4

    def z_of(dots: list[list[float]]) -> float:  # N · mean of exp(dot/τ) over all 6 entries
        return n * sum(math.exp(d / tau) for row in dots for d in row) / 6

    z_s, z_t = z_of(student_dots), z_of(teacher_dots)
    assert method.log_z.tolist() == pytest.approx([math.log(z_s), math.log(z_t)], rel=1e-5)
    expected = [
        hand_nce(student_dots[i], z_s, c, tau) + hand_nce(teacher_dots[i], z_t, c, tau)
        for i in range(2)
    ]
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)


def test_small_temperature_stays_finite_by_hand() -> None:
    # τ = 0.005: exp(dot/τ) reaches e²⁰⁰ ≈ 7·10⁸⁶, far beyond float32 (and Z with it);
    # in double precision the hand values are ordinary numbers.
    tau, n, c = 0.005, 4, 2 / 4
    method = hand_method(temperature=tau)
    s = torch.tensor(STUDENT, requires_grad=True)
    loss = method.loss(outputs(s, torch.tensor(TEACHER), torch.tensor(INDEX)))
    student_dots = [[0.6, 0.8, -0.8], [-1.0, 1.0, 0.0]]
    teacher_dots = [[1.0, 0.0, 0.6], [1.4 * R, R, R]]
    z_s, z_t = (
        n * sum(math.exp(d / tau) for r in dots for d in r) / 6
        for dots in (student_dots, teacher_dots)
    )
    assert method.log_z.tolist() == pytest.approx([math.log(z_s), math.log(z_t)], rel=1e-5)
    expected = [
        hand_nce(student_dots[i], z_s, c, tau) + hand_nce(teacher_dots[i], z_t, c, tau)
        for i in range(2)
    ]
    assert loss.tolist() == pytest.approx(expected, rel=1e-4)
    loss.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_memory_momentum_update_by_hand() -> None:
    method = hand_method()
    method.loss(outputs(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(INDEX)))
    # Rows i ← normalize(0.5·M_i + 0.5·v_i); rows 1 and 3 were not in the batch.
    s10 = 1 / math.sqrt(10)  # student row 0: (0, 1)/2 + (0.6, 0.8)/2 = (0.3, 0.9)
    s5 = 1 / math.sqrt(5)  # student row 2: (0.6, 0.8)/2 + (1, 0)/2 = (0.8, 0.4)
    expected_s = [[s10, 3 * s10], [1.0, 0.0], [2 * s5, s5], [-0.8, 0.6]]
    # Teacher row 0: bisector of (1, 0) and (0, 1); row 2: of 180° and 45°, i.e. 112.5°.
    a = math.radians(112.5)
    expected_t = [[R, R], [0.0, 1.0], [math.cos(a), math.sin(a)], [0.0, -1.0]]
    for got, want in ((method.memory_s, expected_s), (method.memory_t, expected_t)):
        for got_row, want_row in zip(got.tolist(), want, strict=True):
            assert got_row == pytest.approx(want_row, abs=1e-6)
    assert not method.memory_s.requires_grad and method.memory_s.grad_fn is None


def test_z_is_fixed_after_first_batch_and_eval_changes_nothing() -> None:
    method = hand_method()
    index = torch.tensor(INDEX)
    method.eval()
    method.loss(outputs(torch.tensor(STUDENT), torch.tensor(TEACHER), index))
    assert method.log_z.isnan().all()  # eval mode: Z used, not stored
    assert method.memory_t.tolist() == MEMORY_T
    method.train()
    method.loss(outputs(torch.tensor(STUDENT), torch.tensor(TEACHER), index))
    z_first = method.log_z.clone()
    assert torch.isfinite(z_first).all()
    other = torch.tensor([[-2.0, 1.0], [0.0, 5.0]])
    method.loss(outputs(other, other, index))
    assert torch.equal(method.log_z, z_first)


def test_negatives_skip_the_positive_and_k_is_clamped() -> None:
    method = CRD("s", "t", feat_dim=2)
    method.setup(outputs(torch.ones(2, 3), torch.ones(2, 5), None), StageContext(1, 4))
    assert method.k == 3  # 16384 clamped to num_samples − 1
    index = torch.tensor([1] * 200 + [0] * 200)
    torch.manual_seed(0)
    draw = method.sample_negatives(index)
    assert draw.shape == (400, 3)
    assert set(draw[:200].flatten().tolist()) == {0, 2, 3}
    assert set(draw[200:].flatten().tolist()) == {1, 2, 3}
    torch.manual_seed(0)
    assert torch.equal(method.sample_negatives(index), draw)  # global RNG: reproducible


def test_state_dict_holds_memories_and_z() -> None:
    method = hand_method()
    method.loss(outputs(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(INDEX)))
    state = method.state_dict()
    assert {"memory_s", "memory_t", "log_z", "embed_s.weight", "embed_t.weight"} <= set(state)
    assert state["memory_s"].shape == (4, 2) and state["log_z"].shape == (2,)
    fresh = CRD("s", "t", feat_dim=2, num_negatives=2, temperature=0.5)
    probe = outputs(torch.tensor(STUDENT), torch.tensor(TEACHER), torch.tensor(INDEX))
    fresh.setup(probe, StageContext(epochs=1, num_samples=4))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.log_z, method.log_z)
    assert torch.equal(fresh.memory_t, method.memory_t)


def test_setup_initializes_unit_memories() -> None:
    torch.manual_seed(0)
    method = CRD("s", "t")
    method.setup(outputs(torch.ones(2, 3), torch.ones(2, 5), None), StageContext(1, 10))
    assert method.memory_s.shape == method.memory_t.shape == (10, 128)
    norms = torch.cat([method.memory_s, method.memory_t]).norm(dim=1)
    assert norms.tolist() == pytest.approx([1.0] * 20, abs=1e-5)
    assert method.log_z.isnan().all()
    assert not torch.equal(method.memory_s, method.memory_t)


def test_gradients_reach_student_and_embeddings_only() -> None:
    s = torch.randn(3, 5, requires_grad=True)
    grads = []
    for seed in (0, 1):  # two different teachers, the same method state and negatives
        torch.manual_seed(seed)
        t = torch.randn(3, 6)
        torch.manual_seed(2)
        method = CRD("s", "t", feat_dim=4, num_negatives=3)
        method.setup(outputs(s.detach(), t, None), StageContext(1, 8))
        s.grad = None
        method.loss(outputs(s, t, torch.tensor([0, 5, 7]))).sum().backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
        grads.append(s.grad.clone())
        for p in method.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
        for buffer in method.buffers():
            assert buffer.grad is None and buffer.grad_fn is None
    # The student gets gradient only through its own anchor against the constant teacher
    # memory (rows untouched by these teachers' features, which only update it after).
    torch.testing.assert_close(grads[0], grads[1])


def test_defaults_and_bad_arguments() -> None:
    method = CRD("s", "t")
    assert (method.feat_dim, method.num_negatives, method.temperature, method.momentum) == (
        128,
        16384,
        0.07,
        0.5,
    )
    assert (CRD.default_weight, CRD.needs_index, CRD.family) == (0.8, True, "relation")
    for bad in ({"temperature": 0.0}, {"momentum": 1.0}, {"num_negatives": 0}, {"feat_dim": 0}):
        with pytest.raises(ValueError):
            CRD("s", "t", **bad)


def test_user_errors_for_missing_size_and_index() -> None:
    probe = outputs(torch.ones(2, 3), torch.ones(2, 3), None)
    with pytest.raises(UserError, match="training-set size"):
        CRD("s", "t").setup(probe, StageContext(epochs=1, num_samples=None))
    method = CRD("s", "t")
    method.setup(probe, StageContext(epochs=1, num_samples=4))
    with pytest.raises(UserError, match="index"):
        method.loss(probe)
    with pytest.raises(UserError, match=r"index 4 is outside .*\[0, 4\)"):
        method.loss(outputs(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0, 4])))


# --------------------------------------------------- frozen teacher, stage run


def indexed(loader: DataLoader) -> DataLoader:
    x, y = loader.dataset.tensors  # type: ignore[attr-defined]
    dataset = TensorDataset(x, y, torch.arange(len(x)))
    return DataLoader(dataset, batch_size=32, shuffle=False)


def test_run_without_index_is_a_user_error(student, teacher, tiny_data, monkeypatch) -> None:
    monkeypatch.setitem(smskd.methods.registry.METHODS, "crd", CRD)
    train, test = tiny_data
    with pytest.raises(UserError, match="index"):
        run_stages(
            student,
            teacher,
            [Stage(methods=["crd"], epochs=1)],
            train,
            test,
            progress=False,
            log=lambda _: None,
        )
