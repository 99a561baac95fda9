"""The documentation cannot drift: generated pages match their generator, links resolve."""

from __future__ import annotations

import re
from pathlib import Path

from smskd.cli.schema_docs import config_reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_config_reference_is_generated_from_the_schema() -> None:
    committed = (ROOT / "docs" / "config-reference.md").read_text()
    assert committed == config_reference(), (
        "docs/config-reference.md is stale: "
        "python -m smskd.cli.schema_docs > docs/config-reference.md"
    )


def test_config_reference_covers_every_key() -> None:
    from smskd.config import PerformanceConfig, RunConfig, Stage, TrackingConfig
    from smskd.methods.registry import METHODS

    page = config_reference()
    for model in (RunConfig, Stage, PerformanceConfig, TrackingConfig):
        for key in model.model_fields:
            assert f"| `{key}` |" in page, f"{model.__name__}.{key}"
    for name in METHODS:
        assert f"| `{name}` |" in page
    assert "| `every_steps` | int | `10` | > 0 |" in page


def test_relative_links_resolve() -> None:
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} → {target}")
    assert not broken, broken


def test_anchors_into_the_config_reference_exist() -> None:
    page = (ROOT / "docs" / "config-reference.md").read_text()
    headings = {
        re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", page, re.M)
    }
    for doc in PAGES:
        for anchor in re.findall(r"config-reference\.md#([\w-]+)", doc.read_text()):
            assert anchor in headings, f"{doc.name}: #{anchor}"


def test_readme_lists_every_optional_extra() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = re.findall(r"^([\w-]+) = \[", section, re.M)  # tomllib is Python >= 3.11
    assert {"tensorboard", "mlflow", "onnx", "dev"} <= set(extras)
    readme = (ROOT / "README.md").read_text()
    for extra in extras:
        assert f"| `{extra}` |" in readme, f"extra {extra!r} is not in the README's table"


def test_readme_stays_short_and_every_docs_page_is_indexed() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 330
    for page in (ROOT / "docs").glob("*.md"):
        assert f"(docs/{page.name})" in readme, f"docs/{page.name} is not linked from the README"
