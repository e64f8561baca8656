"""The one exception type for mistakes a user can fix.

The CLI turns a DermkohyaError into one red line (or one list) and exit 1; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class DermkohyaError(Exception):
    """A user-fixable problem. The message names the file, line or key, and the fix."""


class ProblemsError(DermkohyaError):
    """Several problems found in one pass (a run file, a CSV): all are reported at once."""

    def __init__(self, source: str, problems: Iterable[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s)\n{lines}")
