"""`dermkohya prepare`: a public dataset's metadata CSV and images → kohya folders, captions and repeats.

FairSkin-style training needs every Fitzpatrick skin type seen about equally often, while real datasets
are mostly FST I–III. kohya expresses "seen more often" as a subset's repeats, so a target balance
becomes integer repeats per (diagnosis, skin type) folder, capped to bound memorisation of the few
FST V–VI images, with every target the data cannot reach reported rather than silently missed.

The pipeline is explicit and one-way, one module per step: recipe.py (the recipe) → importers (records) →
plan.py (diagnosis filter, split.py's held-out split, balance.py's repeats, names and captions) →
images.py and write.py (images and captions in a scratch folder, swapped into place) → record.py
(`prepared.json`). Everything is checked before anything is written; a failure leaves no partial output
behind, the source images are only ever read, and the output is rebuilt bit for bit from the same inputs.
"""

from __future__ import annotations

from dermkohya.prepare.balance import BalancePlan, plan_balance
from dermkohya.prepare.images import ImageJob, prepare_image, workers
from dermkohya.prepare.plan import Item, Plan, make_plan
from dermkohya.prepare.recipe import DEFAULT_TEMPLATE, TEMPLATE_VARIABLES, Recipe, load_recipe, render_caption
from dermkohya.prepare.record import PREPARED_JSON, Prepared, load_prepared
from dermkohya.prepare.split import split_heldout
from dermkohya.prepare.write import PREPARED_DIR, prepare

__all__ = [
    "DEFAULT_TEMPLATE", "PREPARED_DIR", "PREPARED_JSON", "TEMPLATE_VARIABLES", "BalancePlan", "ImageJob", "Item", "Plan",
    "Prepared", "Recipe", "load_prepared", "load_recipe", "make_plan", "plan_balance", "prepare", "prepare_image",
    "render_caption", "split_heldout", "workers",
]
