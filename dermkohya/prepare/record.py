"""prepared.json: what `prepare` made, for the stages after it (render, check, evaluate) and for people.

A typed, versioned record (records.py): written only by `prepare`, read only through `Prepared.read` /
`load_prepared`. Paths in it are relative to the recipe's folder. Counts are per diagnosis × skin type:
`counts_before` images, `counts_after` effective samples (images × repeats), never one for the other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from dermkohya.errors import DermkohyaError
from dermkohya.records import Record, RecordError
from dermkohya.skin import FST_GROUPS, FST_TYPES, UNKNOWN

PREPARED_JSON = "prepared.json"
Counts = dict[str, dict[str, int]]  # diagnosis → skin type → number


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputFile(_Part):
    path: str
    sha256: str


class PreparedSource(_Part):
    format: str
    name: str
    recipe: InputFile
    metadata: InputFile
    labels: InputFile | None = None
    records: int
    licences: dict[str, int]
    skipped: dict[str, int]


class PreparedSplit(_Part):
    heldout_fraction: float
    seed: int
    stratified_by: list[str]
    grouped_by: str
    train_images: int
    heldout_images: int
    counts_heldout: Counts


class PreparedBalance(_Part):
    policy: str
    shares: dict[str, float] | None
    max_repeats: int
    tolerance: float
    unknown_fst: str
    target: dict[str, float]
    achieved: dict[str, float]
    within_tolerance: bool
    unreachable: list[str]


class PreparedSubset(_Part):
    folder: str
    image_dir: str
    num_repeats: int
    diagnosis: str
    fst: str
    images: int


class Prepared(Record):
    KIND: ClassVar[str] = "prepared"
    VERSION: ClassVar[int] = 2
    REMEDY: ClassVar[str] = "run `dermkohya prepare --force datasets/<name>/dataset.toml` to rewrite it"

    made_by: str
    recipe: str
    source: PreparedSource
    train_data_dir: str
    heldout_dir: str
    kohya_dataset_config: str
    content_hash: str | None
    heldout_hash: str | None
    inputs_fingerprint: str
    caption_template: str
    caption_extra: str
    caption_extension: str
    resolution: tuple[int, int]
    resize: str
    image_format: str
    split: PreparedSplit
    counts_source: Counts
    counts_before: Counts
    counts_after: Counts
    balance: PreparedBalance
    repeats: dict[str, int]
    subsets: list[PreparedSubset]
    notes: list[str]
    images: dict[str, int] | None = None  # what happened to each image ('linked', 'written', …); None on a dry run

    @property
    def effective_samples(self) -> int:
        """Training samples per epoch: images × repeats over every subset."""
        return sum(n for row in self.counts_after.values() for n in row.values())

    def by_skin_type(self) -> list[SkinTypeRow]:
        """Per skin type (in I–VI, group, unknown order): images, effective samples, share, target."""
        images: Counter[str] = Counter()
        effective: Counter[str] = Counter()
        for diagnosis, row in self.counts_before.items():
            for fst, n in row.items():
                images[fst] += n
                effective[fst] += self.counts_after[diagnosis][fst]
        total = sum(effective.values()) or 1
        target = self.balance.target if self.balance.policy in ("fst", "shares") else {}
        return [SkinTypeRow(fst, images[fst], effective[fst], effective[fst] / total, target.get(fst))
                for fst in (*FST_TYPES, *FST_GROUPS, UNKNOWN) if fst in images]


@dataclass(frozen=True)
class SkinTypeRow:
    fst: str
    images: int
    effective: int
    share: float
    target: float | None


def load_prepared(recipe_dir: Path) -> Prepared:
    """prepared.json of datasets/<name>/ (the folder, or its dataset.toml), for the stages after prepare."""
    recipe_dir = Path(recipe_dir)
    if recipe_dir.is_file():
        recipe_dir = recipe_dir.parent
    path = recipe_dir / PREPARED_JSON
    if not path.is_file():
        raise DermkohyaError(f"{path} not found: run `dermkohya prepare {recipe_dir / 'dataset.toml'}` first")
    try:
        record = Prepared.read(path)
    except RecordError:
        if '"format": 1,' in path.read_text(encoding="utf-8", errors="replace"):  # before records.py: a bare number
            raise DermkohyaError(f"{path}: written by an older dermkohya (prepared.json format 1): run `dermkohya "
                                 f"prepare {recipe_dir / 'dataset.toml'}` to rewrite it (the images stay)") from None
        raise
    if not (recipe_dir / record.train_data_dir).is_dir():
        raise DermkohyaError(f"{recipe_dir / record.train_data_dir} is missing: run `dermkohya prepare` again")
    return record
