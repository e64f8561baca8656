"""Markers: `kohya` needs sd-scripts and kohya's Python, `gpu` needs CUDA, `browser` needs chromium and
Playwright. Each skips with one reason line."""

from __future__ import annotations

import importlib.util

import pytest

from dermkohya import kohya

_skipped: dict[str, tuple[int, str]] = {}


def _kohya_missing() -> str | None:
    try:
        kohya.find_sd_scripts()
        kohya.find_python()
    except Exception as exc:  # the reason is the user-facing message
        return str(exc).splitlines()[0]
    return None


def _gpu_missing() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU on this machine"


def _browser_missing() -> str | None:
    import os

    if not os.path.exists("/usr/bin/chromium"):
        return "no /usr/bin/chromium (make browser installs Debian's chromium and Playwright)"
    return None if importlib.util.find_spec("playwright") else "Playwright for Python is not installed (make browser)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    checks = {"kohya": _kohya_missing, "gpu": _gpu_missing, "browser": _browser_missing}
    reasons: dict[str, str | None] = {}
    for item in items:
        for name, check in checks.items():
            if name not in item.keywords:
                continue
            if name not in reasons:
                reasons[name] = check()
            reason = reasons[name]
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"{name}: {reason}"))
                count, _ = _skipped.get(name, (0, reason))
                _skipped[name] = (count + 1, reason)


def pytest_terminal_summary(terminalreporter) -> None:
    for name, (count, reason) in _skipped.items():
        terminalreporter.write_line(f"skipped {count} `{name}` test(s): {reason}")
