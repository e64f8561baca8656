"""Runs every case of the fault corpus; each ends with the user's files byte for byte as they were."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import registry
from .project import Project

CASES = registry.load()
README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="session")
def stand_in_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from _lora_fixture import write_kohya_lora

    return write_kohya_lora(tmp_path_factory.mktemp("lora") / "lora.safetensors", rank=4, alpha=4.0, output_name="tiny")


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory, stand_in_lora: Path) -> Project:
    return Project(tmp_path_factory.mktemp("faults-template"), stand_in_lora).build()


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: Project) -> Project:
    from dermkohya import kohya

    monkeypatch.setattr(kohya, "REQUIRED_MODULES", ("accelerate",))  # the stand-in needs no more of kohya's environment
    monkeypatch.chdir(tmp_path)
    return template.copy(tmp_path).configure(monkeypatch.setenv, cache=template.tmp / "cache")


def _param(case: registry.Case) -> object:
    return pytest.param(case, id=case.id, marks=[getattr(pytest.mark, m) for m in case.marks])


@pytest.mark.parametrize("case", [_param(c) for c in CASES.values()])
def test_case(case: registry.Case, project: Project) -> None:
    case.run(project)
    project.verify()


def test_the_corpus_has_forty_distinct_cases_in_every_area() -> None:
    assert len(CASES) >= 40
    assert {c.area for c in CASES.values()} == set(registry.AREAS)
    outcomes = [c.outcome for c in CASES.values()]
    assert len(set(outcomes)) == len(outcomes), "two cases claim the same outcome: one is a near-duplicate"


def test_the_readme_table_is_generated_from_the_corpus() -> None:
    text = README.read_text(encoding="utf-8")
    assert registry.replace_block(text, registry.readme_block(CASES)) == text, (
        "README.md's fault table differs from the corpus: run `python -m tests.faults --readme`"
    )
