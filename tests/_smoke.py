"""The full-size SD 1.5 smoke model, built once per machine and shared by every test that needs it.

`basemodel.ensure_smoke_model("sd15")` builds it (≈2 GB, ≈40 s) into dermkohya's cache, where the
shared kohya run (tests/_kohya_run.py) and tests/test_basemodel.py find it too. A test project gets it
where `dermkohya train` and `dermkohya generate` look for `random:sd15`, the project's
`models/smoke/`, as a symbolic link: one build, however many projects a session makes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dermkohya import basemodel


def link_smoke_model(project: Path) -> Path:
    """Make `random:sd15` of `project` the shared smoke model (built on first use); returns its folder."""
    model, _ = basemodel.ensure_smoke_model("sd15")
    target = basemodel.project_smoke_model("sd15", project)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(model, target_is_directory=True)
    return target


@pytest.fixture(scope="session")
def smoke_sd15_model() -> Path:
    """The shared smoke model's folder (diffusers layout, random weights)."""
    return basemodel.ensure_smoke_model("sd15")[0]
