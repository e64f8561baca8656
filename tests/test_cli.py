"""cli: behaviour of the command line itself that no stage module owns."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _imports import heavy_imports
from click.testing import CliRunner

import dermkohya
from dermkohya.cli import main


def test_train_fails_before_kohya_runs_when_collect_cannot_be_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dermkohya.collect` needs only dermkohya's core dependencies, so an ImportError there is a bug: it
    surfaces at once (with its traceback) instead of a training that silently skips collecting."""
    monkeypatch.delattr(dermkohya, "collect", raising=False)
    monkeypatch.setitem(sys.modules, "dermkohya.collect", None)  # what a broken module looks like to `import`
    result = CliRunner().invoke(main, ["train", str(tmp_path / "runs" / "r.toml")])
    assert isinstance(result.exception, ImportError) and "dermkohya.collect" in str(result.exception)
    assert result.exit_code == 1 and not (tmp_path / "runs").exists() and not (tmp_path / "output").exists()


def test_collect_imports_with_the_core_dependencies_only() -> None:
    """Why the import above is not guarded: collect (and what it imports) needs no optional extra."""
    assert heavy_imports("import dermkohya.collect") == []
