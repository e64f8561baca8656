"""Scan a kohya dataset and report every problem before a GPU hour is spent.

kohya is forgiving in the ways that cost a training run: a folder without an `N_` prefix is skipped
with a log line (and no data at all still exits 0), an image without a caption silently trains on the
folder's class token, EXIF orientation is ignored, a 16-bit greyscale PNG is clipped to white. This
package reads a `train_data_dir` (or a kohya `--dataset_config` TOML, DreamBooth-style and fine-tuning
subsets alike) the way kohya will, never writes to it, and reports all of that in one pass.

Image headers are read by default (PIL opens lazily, which is fast enough for tens of thousands of
files); `decode=True` decodes every image fully in a process pool.

Modules: `layout` (train_data_dir folders), `kohya_config` (dataset TOML), `finetune` (metadata files),
`images` (header facts), `tokens` (CLIP token counts), `sidecar` (metadata.csv), `check` (the scan and
the content hash), `report` (the typed result), `problems` (every code with its fix).
"""

from __future__ import annotations

from dermkohya.dataset.check import content_hash, find_subsets, metadata_counts, parse_resolution, scan
from dermkohya.dataset.images import BOMB_PIXELS
from dermkohya.dataset.layout import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    KOHYA_IMAGE_SUFFIXES,
    Subset,
    SubsetKind,
    parse_subset_folder,
)
from dermkohya.dataset.problems import CODES, Problem, Severity
from dermkohya.dataset.report import CheckReport
from dermkohya.dataset.sidecar import METADATA_FILE
from dermkohya.dataset.tokens import CLIP_CHUNK_TOKENS, ClipTokenCounter, clip_token_counter

__all__ = [
    "BOMB_PIXELS", "CAPTION_EXTENSIONS", "CLIP_CHUNK_TOKENS", "CODES", "IMAGE_EXTENSIONS", "KOHYA_IMAGE_SUFFIXES",
    "METADATA_FILE", "CheckReport", "ClipTokenCounter", "Problem", "Severity", "Subset", "SubsetKind",
    "clip_token_counter", "content_hash", "find_subsets", "metadata_counts", "parse_resolution",
    "parse_subset_folder", "scan",
]
