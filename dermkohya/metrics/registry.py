"""The metrics `dermkohya evaluate` computes: every module of this package that defines `METRIC`.

Adding a metric is one new file (`dermkohya/metrics/<name>.py` with `METRIC = <a base.Metric>`) and its
test; the `--skip` choices, the weight-file check, the report's columns and plots follow from it.
"""

from __future__ import annotations

import importlib
import pkgutil

from dermkohya.metrics.base import Column, Metric

_METRICS: dict[str, Metric] = {}
_discovered = False


def register(metric: Metric) -> Metric:
    """Add a metric; its name and column keys must be new (two metrics writing one key would hide one)."""
    if metric.name in _METRICS:
        raise ValueError(f"metric {metric.name!r} is registered twice")
    taken = {key for other in _METRICS.values() for column in other.columns for key in column.keys}
    if clash := taken.intersection(key for column in metric.columns for key in column.keys):
        raise ValueError(f"metric {metric.name!r}: column key(s) {', '.join(sorted(clash))} already belong to another metric")
    _METRICS[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    _METRICS.pop(name, None)


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import dermkohya.metrics as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if isinstance(getattr(module, "METRIC", None), Metric):
            register(module.METRIC)


def all_metrics() -> list[Metric]:
    """Every registered metric, in table order."""
    _discover()
    return sorted(_METRICS.values(), key=lambda m: (m.position, m.name))


def skip_names() -> tuple[str, ...]:
    """The names `--skip` accepts, in table order."""
    return tuple(dict.fromkeys(m.skip for m in all_metrics() if m.skip))


def columns() -> list[Column]:
    return [column for metric in all_metrics() for column in metric.columns]


def row_keys() -> list[str]:
    """Every metric key of a report row (None where a metric is skipped or cannot be computed)."""
    return [key for column in columns() for key in column.keys]


def skip_help() -> str:
    """The `--skip` help line: each name with what leaving it out drops."""
    parts = []
    for skip in skip_names():
        covered = [m.name for m in all_metrics() if m.skip == skip]
        parts.append(skip if covered == [skip] else f"{skip} ({', '.join(covered)})")
    return "Metrics to leave out, comma-separated: " + ", ".join(parts) + "."
