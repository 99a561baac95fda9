"""Baselines and ablations as stage lists derived from one SMSKD config.

Every kind keeps the student budget of the SMSKD run: the same total number of
student epochs (a config override changes the budget of all of them alike).

``smskd``          the config's own stages, one method each, reference from stage 2
``scratch``        one stage, labels only
``single``         one stage, one method (default: the first stage's)
``joint``          one stage, every stage's methods summed
``multi-teacher``  one stage, a response method (default: the first one) on the
                   average of the teacher's and the extra teachers' logits
``stages``         the first ``n`` stages, the budget split evenly (n = 1 is ``single``)
``orders``         the stages in another order, each keeping its own settings

One-stage baselines take the first stage's optimizer and schedule. Reference
ablations (off, fixed λ, TCP direction, λ) are config keys, not recipes:
``reference.weighting=none`` and so on.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from smskd.config import MethodSpec, RunConfig, Stage, TeacherConfig

RECIPES = ("scratch", "single", "joint", "smskd", "multi-teacher", "stages", "orders")


def _one_stage(cfg: RunConfig, name: str, methods: list[MethodSpec]) -> RunConfig:
    first = cfg.stages[0]
    stage = Stage(
        name=name,
        methods=methods,
        epochs=cfg.total_epochs,
        ce_weight=first.ce_weight,
        optimizer=first.optimizer,
        schedule=first.schedule,
    )
    return cfg.model_copy(update={"stages": [stage]})


def _methods(cfg: RunConfig) -> list[MethodSpec]:
    return [spec for stage in cfg.stages for spec in stage.methods]


def recipe(cfg: RunConfig, kind: str, method: str | None = None) -> RunConfig:
    """The ``kind`` baseline of the SMSKD run ``cfg`` (one of the one-config kinds)."""
    all_methods = _methods(cfg)
    if kind == "smskd":
        return cfg
    if kind == "scratch":
        scratch = _one_stage(cfg, "scratch", [])
        return scratch.model_copy(update={"teacher": None, "extra_teachers": []})
    if kind == "single":
        if not all_methods:
            raise ValueError("recipe 'single' needs a config whose stages name KD methods")
        chosen = [s for s in all_methods if s.name == (method or all_methods[0].name)][:1]
        if not chosen:
            raise ValueError(f"method {method!r} is in none of the stages")
        return _one_stage(cfg, chosen[0].name, chosen)
    if kind == "joint":
        return _one_stage(cfg, "joint", all_methods)
    raise ValueError(f"unknown recipe {kind!r}; valid: {', '.join(RECIPES)}")


def multi_teacher(
    cfg: RunConfig, teachers: Sequence[TeacherConfig], method: str | None = None
) -> RunConfig:
    """One stage distilling from the average logits of ``cfg.teacher`` and ``teachers``."""
    from smskd.methods.registry import METHODS

    if not teachers:
        raise ValueError("recipe 'multi-teacher' needs 'teachers': at least one more teacher")
    response = [s for s in _methods(cfg) if METHODS[s.name].family == "response"]
    if method is not None:
        response = [s for s in response if s.name == method] or [MethodSpec(name=method)]
    chosen = response[:1] or [MethodSpec(name="kd")]
    one = _one_stage(cfg, "multi-teacher", chosen)
    return one.model_copy(update={"extra_teachers": list(teachers)})


def first_stages(cfg: RunConfig, n: int) -> RunConfig:
    """The first ``n`` stages sharing the SMSKD run's total epochs (earlier stages take
    the remainder); ``n = 1`` is exactly the ``single`` baseline of the first method."""
    if not 1 <= n <= len(cfg.stages):
        raise ValueError(f"stage count {n} is not in 1..{len(cfg.stages)}")
    if n == 1:
        return recipe(cfg, "single")
    base, extra = divmod(cfg.total_epochs, n)
    stages = [
        stage.model_copy(update={"epochs": base + (k < extra)})
        for k, stage in enumerate(cfg.stages[:n])
    ]
    return cfg.model_copy(update={"stages": stages})


def expand(
    cfg: RunConfig,
    kind: str,
    *,
    method: str | None = None,
    teachers: Sequence[TeacherConfig] = (),
) -> list[tuple[str, RunConfig]]:
    """``(label, config)`` for each run that recipe ``kind`` stands for: ``single``
    without a method is one run per method, ``stages`` one per count 1..K, ``orders``
    one per permutation of the stages (the config's own order first)."""
    if kind == "single" and method is None:
        names = list(dict.fromkeys(spec.name for spec in _methods(cfg)))
        return [(f"single-{name}", recipe(cfg, "single", name)) for name in names]
    if kind == "single":
        return [(f"single-{method}", recipe(cfg, "single", method))]
    if kind == "multi-teacher":
        return [("multi-teacher", multi_teacher(cfg, teachers, method))]
    if kind == "stages":
        return [(f"stages-{n}", first_stages(cfg, n)) for n in range(1, len(cfg.stages) + 1)]
    if kind == "orders":
        runs = []
        for order in itertools.permutations(cfg.stages):
            label = "order-" + "-".join(stage.label for stage in order)
            runs.append((label, cfg.model_copy(update={"stages": list(order)})))
        return runs
    return [(kind, recipe(cfg, kind))]
