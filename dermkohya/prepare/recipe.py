"""The recipe, datasets/<name>/dataset.toml: where the source is, which diagnoses, captions, balance,
image size and held-out split. Loaded through the one TOML loader (schema.py), so every problem comes
at once with its line; checks that span keys or need the file system follow in the same report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import jinja2
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from dermkohya.errors import ProblemsError
from dermkohya.importers import FORMATS
from dermkohya.schema import load_toml_model
from dermkohya.skin import FST_GROUPS, FST_TYPES
from dermkohya.templating import text_template

DEFAULT_TEMPLATE = (
    "clinical dermatology photograph, {{ diagnosis }}"
    "{% if fst != 'unknown' %}, Fitzpatrick skin type {{ fst }}{% endif %}, {{ extra }}"
)
TEMPLATE_VARIABLES = ("diagnosis", "fst", "source", "extra")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ColumnsSection(_Section):
    """Column names of a generic CSV (the demo's layout is the default)."""

    image: str = "image"
    diagnosis: str = "diagnosis"
    fitzpatrick: str | None = "fitzpatrick"
    group: str | None = None


class SourceSection(_Section):
    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value not in FORMATS:
            raise ValueError(f"{value!r} is not a source format; use one of {', '.join(FORMATS)}")
        return value

    format: str  # one of importers.FORMATS
    metadata: str
    images: str | None = None  # default: the metadata file's folder
    labels: str | None = None  # SCIN's scin_labels.csv
    label: str | None = None  # which column names the diagnosis (fitzpatrick17k, ddi, isic)
    licence: str | None = None
    columns: ColumnsSection | None = None  # generic only
    missing_images: Literal["error", "skip"] = "error"


class DiagnosesSection(_Section):
    """Names as the source writes them (after the importer's readable names, before renames)."""

    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    rename: dict[str, str] = Field(default_factory=dict)


class CaptionSection(_Section):
    template: str = DEFAULT_TEMPLATE
    extra: str = ""


class BalanceSection(_Section):
    policy: Literal["none", "fst", "fst_x_diagnosis", "shares"] = "fst"
    shares: dict[str, float] | None = None
    max_repeats: int = Field(20, ge=1, le=1000)
    tolerance: float = Field(0.05, gt=0, lt=1)
    unknown_fst: Literal["keep", "drop"] = "keep"


def _resolution(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    raise ValueError("give one size (512) or [width, height]")


class ImagesSection(_Section):
    resolution: Annotated[tuple[int, int], BeforeValidator(_resolution)] = (512, 512)
    resize: Literal["crop", "fit", "none"] = "crop"
    format: Literal["auto", "jpeg", "png"] = "auto"
    jpeg_quality: int = Field(95, ge=50, le=100)


class SplitSection(_Section):
    heldout: float = Field(0.1, ge=0, lt=1)
    seed: int = 0


class Recipe(_Section):
    source: SourceSection
    diagnoses: DiagnosesSection = Field(default_factory=DiagnosesSection)
    caption: CaptionSection = Field(default_factory=CaptionSection)
    balance: BalanceSection = Field(default_factory=BalanceSection)
    images: ImagesSection = Field(default_factory=ImagesSection)
    split: SplitSection = Field(default_factory=SplitSection)

    @property
    def size(self) -> tuple[int, int]:
        return self.images.resolution


def load_recipe(path: Path) -> Recipe:
    """The validated recipe; every problem (unknown keys with the nearest valid one and their line, bad
    values, a template that does not render) is reported at once, through the one TOML loader."""
    recipe = load_toml_model(Path(path), Recipe, what="recipe", example="datasets/demo/dataset.toml")
    problems = _semantic_problems(recipe, Path(path).parent)
    if problems:
        raise ProblemsError(str(path), problems)
    return recipe


def _semantic_problems(recipe: Recipe, recipe_dir: Path) -> list[str]:
    """Checks that span keys or need the file system, in the same one-pass report."""
    problems: list[str] = []
    source = recipe.source
    if source.labels is not None and source.format != "scin":
        problems.append("`source.labels` is only for format = \"scin\" (SCIN's scin_labels.csv)")
    if source.columns is not None and source.format != "generic":
        problems.append(f"`source.columns` is only for format = \"generic\"; {source.format} has fixed columns")
    if source.label is not None:
        choices = FORMATS[source.format].labels
        if source.label not in choices:
            allowed = f"one of {', '.join(choices)}" if choices else f"not an option for {source.format}"
            problems.append(f"`source.label` = {source.label!r}: {allowed}")
    metadata = recipe_dir / source.metadata
    if not metadata.is_file():
        problems.append(f"`source.metadata`: {metadata} does not exist")
    images = recipe_dir / source.images if source.images else metadata.parent
    if not images.is_dir():
        problems.append(f"`source.images`: {images} is not a folder")
    if source.labels and not (recipe_dir / source.labels).is_file():
        problems.append(f"`source.labels`: {recipe_dir / source.labels} does not exist")

    balance = recipe.balance
    if balance.policy == "shares":
        problems.extend(_share_problems(balance.shares))
    elif balance.shares is not None:
        problems.append(f"`balance.shares` is only used with policy = \"shares\" (policy is {balance.policy!r})")

    width, height = recipe.size
    if min(width, height) < 64 or width % 8 or height % 8:
        problems.append(f"`images.resolution` = {list(recipe.size)}: use multiples of 8, at least 64")

    try:
        render_caption(text_template(recipe.caption.template), "melanoma", "IV", "ISIC", recipe.caption.extra)
    except jinja2.TemplateSyntaxError as exc:
        problems.append(f"`caption.template`: {exc.message} (line {exc.lineno} of the template)")
    except jinja2.UndefinedError as exc:
        problems.append(f"`caption.template`: {exc.message}; the variables are {', '.join(TEMPLATE_VARIABLES)}")
    return problems


def _share_problems(shares: dict[str, float] | None) -> list[str]:
    if not shares:
        return ["policy = \"shares\" needs `balance.shares`, e.g. { I = 10, II = 10, III = 15, IV = 15, V = 25, VI = 25 }"]
    keys = set(shares)
    for level in (FST_TYPES, FST_GROUPS):
        if keys <= set(level):
            missing = [k for k in level if k not in keys]
            problems = [f"`balance.shares` lacks {', '.join(missing)}: give every skin type a share"] if missing else []
            return problems + [f"`balance.shares.{k}` = {v}: shares must be positive" for k, v in shares.items() if v <= 0]
    bad = sorted(keys - set(FST_TYPES) - set(FST_GROUPS))
    if bad:
        return [f"`balance.shares.{k}`: not a skin type; use I–VI or the groups I-II, III-IV, V-VI" for k in bad]
    return ["`balance.shares`: give shares for the six types I–VI or for the three groups, not a mix"]


def render_caption(template: jinja2.Template, diagnosis: str, fst: str, source: str, extra: str) -> str:
    """The caption of one image. Whitespace is collapsed and empty comma-separated parts dropped, so
    an empty `extra` leaves no dangling comma."""
    text = " ".join(template.render(diagnosis=diagnosis, fst=fst, source=source, extra=extra).split())
    return ", ".join(part.strip() for part in text.split(",") if part.strip())
