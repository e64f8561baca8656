"""The checker's result: every problem of one dataset plus the summary a practitioner wants before training.

Typed data only: `dermkohya check` prints it (dermkohya/cli/) or writes `to_dict()` as JSON; training refuses
to start on `has_errors()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermkohya.dataset.layout import Subset
from dermkohya.dataset.problems import Problem, display
from dermkohya.dataset.tokens import CLIP_CHUNK_TOKENS


@dataclass
class CheckReport:
    """Every problem of one dataset plus the summary a practitioner wants before training."""

    root: Path
    caption_extension: str
    resolution: tuple[int, int]
    decode: bool
    subsets: list[Subset]
    problems: list[Problem]
    token_histogram: dict[str, int]
    tokenizer: str
    fst_counts: dict[str, dict[str, int]]  # FST -> {"images": n, "effective": n}
    diagnosis_counts: dict[str, dict[str, int]]
    content_hash: str
    seconds: float

    @property
    def images(self) -> int:
        """Images of every subset, regularisation ones included."""
        return sum(len(s.images) for s in self.subsets)

    @property
    def effective_samples(self) -> int:
        return sum(s.effective_samples for s in self.subsets)

    @property
    def reg_subsets(self) -> list[Subset]:
        return [s for s in self.subsets if s.is_reg]

    @property
    def reg_images(self) -> int:
        return sum(len(s.images) for s in self.reg_subsets)

    @property
    def reg_effective_samples(self) -> int:
        """kohya's "reg images with repeats", counted apart from the training images."""
        return sum(s.effective_samples for s in self.reg_subsets)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def has_errors(self, strict: bool = False) -> bool:
        """True when training should not start: any error, or with `strict` any warning too."""
        return bool(self.errors) or (strict and bool(self.warnings))

    def by_code(self) -> dict[str, list[Problem]]:
        """Problems grouped by code, errors first, then by how many files each touches."""
        groups: dict[str, list[Problem]] = {}
        for found in self.problems:
            groups.setdefault(found.code, []).append(found)
        return dict(sorted(groups.items(), key=lambda kv: (
            0 if any(p.severity == "error" for p in kv[1]) else 1, -len(kv[1]), kv[0])))

    def display(self, path: Path) -> str:
        """A path as the report shows it (relative to the dataset root where it lies below it)."""
        return display(path, self.root)

    def subset_label(self, subset: Subset) -> str:
        """A subset's name in the report: its folder, or its metadata file for a fine-tuning subset."""
        if subset.kind == "fine-tuning" and subset.metadata_file is not None:
            return self.display(subset.metadata_file)
        return self.display(subset.path)

    def to_dict(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "images": self.images,
            "effective_samples": self.effective_samples,
            "subsets": [self._subset_dict(s) for s in self.subsets],
            "caption_tokens": {"tokenizer": self.tokenizer, "histogram": self.token_histogram,
                               "chunk_limit": CLIP_CHUNK_TOKENS},
            "fitzpatrick": self.fst_counts,
            "diagnosis": self.diagnosis_counts,
            "content_hash": self.content_hash,
        }
        if self.reg_subsets:
            summary["train"] = {"images": self.images - self.reg_images,
                                "effective_samples": self.effective_samples - self.reg_effective_samples}
            summary["reg"] = {"images": self.reg_images, "effective_samples": self.reg_effective_samples}
        return {
            "root": str(self.root),
            "caption_extension": self.caption_extension,
            "resolution": list(self.resolution),
            "decode": self.decode,
            "ok": not self.errors,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "counts": {code: len(problems) for code, problems in self.by_code().items()},
            "problems": [p.to_dict(self.root) for p in self.problems],
            "summary": summary,
            "seconds": round(self.seconds, 3),
        }

    def _subset_dict(self, s: Subset) -> dict[str, Any]:
        entry: dict[str, Any] = {"folder": self.display(s.path), "repeats": s.repeats, "concept": s.concept,
                                 "is_reg": s.is_reg, "images": len(s.images), "effective_samples": s.effective_samples}
        if s.kind == "fine-tuning":
            entry["kind"] = s.kind
            entry["metadata_file"] = self.display(s.metadata_file) if s.metadata_file else None
        return entry
