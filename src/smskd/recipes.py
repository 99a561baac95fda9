"""Baselines as stage lists derived from one SMSKD config, at equal total epochs.

``smskd``  the config's own stages, one method each, reference from stage 2
``scratch`` one stage, labels only
``single``  one stage, one method (default: the first stage's)
``joint``   one stage, every stage's methods summed

Each baseline takes the first stage's optimizer and schedule and the sum of all
stages' epochs, so the comparison is at the same student budget.
"""

from __future__ import annotations

from smskd.config import MethodSpec, RunConfig, Stage

RECIPES = ("scratch", "single", "joint", "smskd")


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


def recipe(cfg: RunConfig, kind: str, method: str | None = None) -> RunConfig:
    """The ``kind`` baseline of the SMSKD run ``cfg``."""
    all_methods = [spec for stage in cfg.stages for spec in stage.methods]
    if kind == "smskd":
        return cfg
    if kind == "scratch":
        scratch = _one_stage(cfg, "scratch", [])
        return scratch.model_copy(update={"teacher": None})
    if kind == "single":
        chosen = [s for s in all_methods if s.name == (method or all_methods[0].name)][:1]
        if not chosen:
            raise ValueError(f"method {method!r} is in none of the stages")
        return _one_stage(cfg, chosen[0].name, chosen)
    if kind == "joint":
        return _one_stage(cfg, "joint", all_methods)
    raise ValueError(f"unknown recipe {kind!r}; valid: {', '.join(RECIPES)}")
