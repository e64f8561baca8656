"""Throughput of `dermkohya prepare`: N generated records (JPEG photographs of mixed sizes) → 512×512 crops.

Target (issue #3): ≥ 100 images/s for 20,000 records on a 2-core machine. The figure counts the whole
`prepare` call (CSV import, split, repeats, decode/orient/resize/encode in a process pool, captions,
metadata, content hash); generating the source images is not timed. A second, unchanged run (the
up-to-date check, which re-hashes the output) is timed too. Writes bench/results/prepare-throughput.json.

    .venv/bin/python bench/prepare_throughput.py [--records 20000] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from dermkohya import __version__, prepare
from dermkohya.skin import FST_TYPES

RESULTS = Path(__file__).resolve().parent / "results" / "prepare-throughput.json"
SOURCE_SIZES = ((640, 480), (800, 600), (1024, 768), (1600, 1200))  # web atlases to phone/dermatoscope exports
DIAGNOSES = ("psoriasis", "eczema", "melanoma", "basal cell carcinoma", "nevus")
# Skewed like the public sets: mostly FST I–III, few V–VI.
FST_WEIGHTS = (0.25, 0.30, 0.22, 0.13, 0.06, 0.04)


def _texture(seed: int) -> np.ndarray:
    """A skin-like 1600×1200 base: smooth shading, a darker blob, fine noise (JPEG sizes like photographs)."""
    rng = np.random.default_rng(seed)
    h, w = 1200, 1600
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    tone = rng.uniform(60, 220, 3).astype(np.float32)
    shade = 0.85 + 0.15 * np.sin(xx / rng.uniform(150, 400)) * np.cos(yy / rng.uniform(150, 400))
    cy, cx, r = rng.uniform(300, 900), rng.uniform(400, 1200), rng.uniform(80, 300)
    blob = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))[..., None]
    pixels = tone * shade[..., None] * (1 - 0.45 * blob) + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _make_chunk(args: tuple[Path, int, int]) -> list[tuple[str, str, str]]:
    root, start, stop = args
    rows = []
    textures = [_texture(s) for s in range(start % 7, start % 7 + 3)]
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        w, h = SOURCE_SIZES[i % len(SOURCE_SIZES)]
        base = textures[i % len(textures)]
        y, x = int(rng.integers(0, 1200 - h + 1)), int(rng.integers(0, 1600 - w + 1))
        tile = base[y:y + h, x:x + w].copy()
        tile[:4, :4] = rng.integers(0, 255, (4, 4, 3))  # every file distinct
        rel = f"images/{i // 1000:03d}/img_{i:06d}.jpg"
        buffer = io.BytesIO()
        Image.fromarray(tile).save(buffer, "JPEG", quality=90)
        (root / rel).write_bytes(buffer.getvalue())
        fst = FST_TYPES[int(rng.choice(6, p=FST_WEIGHTS))]
        rows.append((rel, DIAGNOSES[int(rng.integers(len(DIAGNOSES)))], fst))
    return rows


def make_source(root: Path, records: int, workers: int) -> None:
    for i in range(0, records, 1000):
        (root / "data" / "images" / f"{i // 1000:03d}").mkdir(parents=True, exist_ok=True)
    step = 500
    chunks = [(root / "data", s, min(s + step, records)) for s in range(0, records, step)]
    with ProcessPoolExecutor(workers) as pool:
        rows = [row for chunk in pool.map(_make_chunk, chunks) for row in chunk]
    with (root / "data" / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "diagnosis", "fitzpatrick"])
        writer.writerows(rows)
    (root / "dataset.toml").write_text(
        '[source]\nformat = "generic"\nmetadata = "data/metadata.csv"\nimages = "data"\nlicence = "generated"\n\n'
        '[balance]\npolicy = "fst"\n\n[images]\nresolution = 512\nresize = "crop"\n\n[split]\nheldout = 0.1\n')


def _cpu_seconds() -> float:
    """User + system time of this process and its finished children (the worker pool)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--workdir", type=Path, help="where the generated source and output go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (and reuse its source next time)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    workers = prepare.workers()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="dermkohya-prepare-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        lines = (root / "data" / "metadata.csv").read_text().count("\n") - 1 if (root / "data" / "metadata.csv").is_file() else 0
        if lines != args.records:
            shutil.rmtree(root / "data", ignore_errors=True)
            started = time.perf_counter()
            make_source(root, args.records, workers)
            print(f"generated {args.records} source images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        for leftover in ("prepared", "prepared.json"):
            path = root / leftover
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        source_bytes = sum(p.stat().st_size for p in (root / "data" / "images").rglob("*.jpg"))

        load_before = os.getloadavg()[0]
        cpu_before = _cpu_seconds()
        started = time.perf_counter()
        record = prepare.prepare(root / "dataset.toml")
        seconds = time.perf_counter() - started
        cpu = _cpu_seconds() - cpu_before
        load_after = os.getloadavg()[0]
        started = time.perf_counter()
        again = prepare.prepare(root / "dataset.toml")
        rerun_seconds = time.perf_counter() - started
        assert again == record
        output_bytes = sum(p.stat().st_size for p in (root / "prepared").rglob("*.jpg"))
        result = {
            "benchmark": "prepare_throughput",
            "records": args.records,
            "images_per_second": round(args.records / seconds, 1),
            "seconds": round(seconds, 2),
            "target_images_per_second": 100,
            "meets_target": args.records / seconds >= 100,
            "rerun_up_to_date_seconds": round(rerun_seconds, 2),
            # the machine may be shared: CPU time per image bounds what free cores would reach
            "cpu_ms_per_image": round(1000 * cpu / args.records, 2),
            "images_per_second_if_cores_free": round(workers * args.records / cpu, 1),
            "load_average_1min": [round(load_before, 2), round(load_after, 2)],
            "workers": workers,
            "source": {"format": "JPEG q90", "sizes": [f"{w}x{h}" for w, h in SOURCE_SIZES], "mean_kib": round(source_bytes / args.records / 1024, 1)},
            "output": {"resolution": list(record.resolution), "resize": record.resize, "format": "JPEG q95 4:4:4",
                       "mean_kib": round(output_bytes / args.records / 1024, 1), "images": record.images,
                       "train_images": record.split.train_images, "heldout_images": record.split.heldout_images,
                       "balance_within_tolerance": record.balance.within_tolerance},
            "machine": {"cpus": os.cpu_count(), "usable_cpus": workers, "python": platform.python_version(),
                        "pillow": PIL.__version__, "dermkohya": __version__, "platform": platform.platform()},
        }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
