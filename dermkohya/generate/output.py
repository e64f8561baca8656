"""What generation leaves on disk: each PNG with its record in a text chunk, the side files of staged
candidates, and `index.csv`, written from the finished images' own records so it always matches them.
(Who writes them, and when: candidates.py, on worker threads.)
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from dermkohya import __version__
from dermkohya.files import write_atomic
from dermkohya.generate.job import REJECTED, STAGING, Job
from dermkohya.generate.plan import SCHEDULER_LABELS, Item

INDEX_COLUMNS = (
    "path", "n", "diagnosis", "fst", "prompt", "negative_prompt", "seed", "attempt", "rejected_attempts",
    "scheduler", "steps", "guidance", "width", "height", "loras", "lora_sha256", "base_model", "precision",
)  # fmt: skip


def png_bytes(image: np.ndarray, record: dict[str, Any]) -> bytes:
    """PNG with the prompt and seed as text chunks: `parameters` (the A1111 line other tools read) and
    `dermkohya` (the full record, JSON)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    loras = ", ".join(f"{Path(lora['path']).name}: {lora['sha256'][:12]} @ {lora['weight']}" for lora in record["loras"])
    params = (
        f"{record['prompt']}\nNegative prompt: {record['negative_prompt']}\n"
        f"Steps: {record['steps']}, Sampler: {SCHEDULER_LABELS[record['scheduler']]}, CFG scale: {record['guidance']}, "
        f"Seed: {record['seed']}, Size: {record['width']}x{record['height']}" + (f", Lora: {loras}" if loras else "")
    )
    info.add_text("parameters", params)
    info.add_text("prompt", record["prompt"])
    info.add_text("seed", str(record["seed"]))
    info.add_text("dermkohya", json.dumps(record, sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


def read_record(png: Path) -> dict[str, Any]:
    """The `dermkohya` text chunk of a generated image."""
    from PIL import Image

    with Image.open(png) as im:
        # png_bytes writes the chunk before the image data, where opening the file finds it; `im.text` would
        # decode the whole image first (~7 ms at 512 px: generate's settling reads every finished image)
        text = im.info.get("dermkohya")
        return json.loads(text if text is not None else im.text["dermkohya"])


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def image_record(job: Job, item: Item, attempt: int, seed: int, phash: int, rejected: list[dict[str, Any]], precision: str) -> dict[str, Any]:
    plan = job.plan
    return {
        "plan": job.name,
        "n": item.n,
        "diagnosis": item.diagnosis,
        "fst": item.fst,
        "prompt": item.prompt,
        "negative_prompt": plan.prompt.negative,
        "seed": seed,
        "attempt": attempt,
        "rejected": rejected,
        "phash": f"{phash:016x}",
        "scheduler": plan.sampler.scheduler,
        "karras": plan.sampler.karras,
        "steps": plan.sampler.steps,
        "guidance": plan.sampler.guidance,
        "width": plan.sampler.width,
        "height": plan.sampler.height,
        "loras": [{"path": lora.path, "sha256": lora.sha256, "weight": lora.weight} for lora in job.loras],
        "base_model": plan.model.base,
        "base_sha256": job.base_sha256,
        "precision": precision,
        "batch_size": plan.engine.batch_size,
        "compile": plan.engine.compile,
        "compile_mode": plan.engine.compile_mode if plan.engine.compile else None,
        "attention": plan.engine.attention,
        "dermkohya_version": __version__,
    }


def write_candidate(staging: Path, n: int, attempt: int, png: bytes, side: dict[str, Any]) -> None:
    write_atomic(staging / f"{n}-{attempt}.png", png)
    write_atomic(staging / f"{n}.json", json.dumps(side))


def write_rejection(out: Path, n: int, attempt: int, png: bytes, side: dict[str, Any]) -> None:
    write_atomic(out / REJECTED / f"{n}-{attempt}.png", png)
    write_atomic(out / STAGING / f"{n}.json", json.dumps(side))


def write_index(job: Job, cache: dict[int, dict[str, Any]]) -> Path:
    """index.csv from the finished images' own records (so it always matches the files), index order."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for item in job.items:
        record = cache.get(item.n)
        if record is None:
            continue
        writer.writerow(
            {
                **{k: record[k] for k in ("n", "diagnosis", "fst", "prompt", "negative_prompt", "seed", "attempt")},
                **{k: record[k] for k in ("scheduler", "steps", "guidance", "width", "height", "base_model", "precision")},
                "path": item.path,
                "rejected_attempts": len(record["rejected"]),
                "loras": ";".join(f"{Path(lora['path']).name}@{lora['weight']}" for lora in record["loras"]),
                "lora_sha256": ";".join(lora["sha256"] for lora in record["loras"]),
            }
        )
    path = job.out / "index.csv"
    write_atomic(path, buffer.getvalue())
    return path
