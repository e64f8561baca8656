"""Balanced synthetic generation with kohya LoRAs: a plan file → `synthetic/<plan>/<diagnosis>/<fst>/<n>.png`.

Why it is built this way:
- Image n has its own seed, derived from (plan seed, n, attempt), and every batch is padded to the plan's
  batch size, so an image's pixels depend on its seed and prompt alone — not on its batch-mates — and are
  the same on 1 or N processes, after a resume, or regenerated alone (`render_one`).
- A finished file is never rewritten. Candidates are written to `.staging/` (atomic renames) and moved
  into place only after the near-duplicate check, which walks each diagnosis × skin-type cell in index
  order so that its decisions never depend on which process finished first.
- Rejections are recorded, not silent: the rejected image goes to `rejected/`, the reason into the
  accepted image's PNG text chunk, `index.csv` and `summary.json`.
- A rerun skips finished images. Everything that changes pixels is fingerprinted into `plan.json` (a
  typed record, `PlanRecord`); a changed plan is refused rather than mixed into the same folder.

The package, in the order a run goes through it: `plan` (the file, quotas, prompts, seeds) → `job` (the
base through the one resolver train uses, LoRAs, plan.json) → `engine` (the diffusers pipeline) →
`run` (processes and rounds) with `filter` (which candidates are kept) and `output` (PNGs, index.csv).
"""

from dermkohya.generate.engine import Classifier, Engine, applied_lora_modules, load_loras, load_pipeline, make_scheduler, render_one
from dermkohya.generate.job import (
    REJECTED,
    STAGING,
    Job,
    LoraInfo,
    PlanRecord,
    fingerprint,
    kohya_modules,
    load_base,
    prepare_job,
    project_root,
    resolve_base,
)
from dermkohya.generate.output import INDEX_COLUMNS, read_record, write_index
from dermkohya.generate.plan import (
    NAME_RE,
    SCHEDULER_LABELS,
    SCHEDULERS,
    Item,
    Plan,
    allocate,
    image_seed,
    load_plan,
    quotas,
    slug,
)
from dermkohya.generate.run import Result, generate

__all__ = [
    "INDEX_COLUMNS", "NAME_RE", "REJECTED", "SCHEDULERS", "SCHEDULER_LABELS", "STAGING", "Classifier", "Engine",
    "Item", "Job", "LoraInfo", "Plan", "PlanRecord", "Result", "allocate", "applied_lora_modules", "fingerprint",
    "generate", "image_seed", "kohya_modules", "load_base", "load_loras", "load_pipeline", "load_plan",
    "make_scheduler", "prepare_job", "project_root", "quotas", "read_record", "render_one", "resolve_base", "slug",
    "write_index",
]  # fmt: skip
