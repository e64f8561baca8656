"""`python -m tests.faults --readme`: rewrite the README block between the faults markers from the corpus."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    if argv != ["--readme"]:
        print("usage: python -m tests.faults --readme", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tests"))  # the case modules import the tests' shared helpers by name
    from tests.faults import registry

    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    updated = registry.replace_block(text, registry.readme_block(registry.load()))
    if updated != text:
        readme.write_text(updated, encoding="utf-8")
    print(f"{readme}: {len(registry.CASES)} fault cases")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
