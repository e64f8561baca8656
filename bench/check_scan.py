"""Benchmark `dermkohya check` on 20,000 generated 512 px JPEGs: header scan (target < 15 s) and --decode.

The images are made once into the system temp folder (about a minute on 2 cores) and reused; the
result goes to bench/results/check-scan.json. Run: `.venv/bin/python bench/check_scan.py [--images N]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from dermkohya import __version__, dataset
from dermkohya.demo import CAPTION_TEMPLATE, DIAGNOSES, demo_image
from dermkohya.skin import FST_TYPES

RESULTS = Path(__file__).resolve().parent / "results" / "check-scan.json"
SIZE = 512
BASES = 48  # distinct procedural scenes; every image is a different crop and exposure of one


def _cell(i: int) -> tuple[str, str]:
    return DIAGNOSES[i % len(DIAGNOSES)], FST_TYPES[(i // len(DIAGNOSES)) % len(FST_TYPES)]


def _base(i: int) -> np.ndarray:
    diagnosis, fst = _cell(i)
    return np.asarray(demo_image(diagnosis, fst, np.random.default_rng([7, i]), SIZE + 128), dtype=np.float32)


def _write_range(args: tuple[str, int, int, int]) -> int:
    out, start, stop, folders = args
    bases = [_base(b) for b in range(BASES)]
    for i in range(start, stop):
        rng = np.random.default_rng([11, i])
        base = bases[i % BASES]
        x, y = rng.integers(0, 128, 2)
        crop = base[y : y + SIZE, x : x + SIZE] * rng.uniform(0.9, 1.1)
        folder = Path(out) / f"{1 + i % folders}_derm_{i % folders}"
        buffer = io.BytesIO()
        Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        (folder / f"img_{i:05d}.jpg").write_bytes(buffer.getvalue())
        diagnosis, fst = _cell(i % BASES)
        (folder / f"img_{i:05d}.txt").write_text(CAPTION_TEMPLATE.format(diagnosis=diagnosis, fst=fst) + "\n")
    return stop - start


def ensure_images(count: int, folders: int = 4) -> Path:
    """The cached benchmark dataset: `<temp>/dermkohya-bench/check-scan-<count>/` (made once)."""
    out = Path(tempfile.gettempdir()) / "dermkohya-bench" / f"check-scan-{count}"
    done = out / ".complete"
    if done.exists():
        return out
    for f in range(folders):
        (out / f"{1 + f}_derm_{f}").mkdir(parents=True, exist_ok=True)
    step = 500
    jobs = [(str(out), s, min(s + step, count), folders) for s in range(0, count, step)]
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for n, _ in enumerate(pool.map(_write_range, jobs), start=1):
            print(f"\rgenerating {min(n * step, count)}/{count} images", end="", file=sys.stderr)
    print(f"\rgenerated {count} images in {time.perf_counter() - started:.0f} s into {out}", file=sys.stderr)
    done.write_text("ok\n")
    return out


CPU: dict[str, float] = {}


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    """Wall seconds of one call; its CPU seconds (this process and its workers) go to CPU[fn name + kwargs]."""
    def cpu() -> float:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    cpu_before, started = cpu(), time.perf_counter()
    result = fn(*args, **kwargs)
    wall = time.perf_counter() - started
    CPU[f"{fn.__name__}{sorted(kwargs.items())}"] = cpu() - cpu_before
    return wall, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    root = ensure_images(args.images)
    nbytes = sum(p.stat().st_size for p in root.rglob("*.jpg"))
    dataset.content_hash(root)  # warm the page cache so every measurement reads from memory alike
    tokenizer_s, _ = timed(dataset.clip_token_counter)  # paid once per process; reported apart
    load_before = os.getloadavg()  # other work on the machine stretches the wall times; CPU seconds less so
    header_s, header = timed(dataset.scan, root)
    serial_s, _ = timed(dataset.scan, root, workers=1)
    decode_s, decoded = timed(dataset.scan, root, decode=True)
    hash_s, _ = timed(dataset.content_hash, root)
    for report in (header, decoded):
        assert report.images == args.images and not report.problems, report.by_code().keys()
    result = {
        "benchmark": "dermkohya check on a generated kohya train_data_dir",
        "images": args.images,
        "image": f"JPEG quality 90, {SIZE}×{SIZE}, with a .txt caption",
        "dataset_megabytes": round(nbytes / 1e6, 1),
        "header_scan_seconds": round(header_s, 2),
        "header_scan_single_process_seconds": round(serial_s, 2),
        "decode_scan_seconds": round(decode_s, 2),
        "content_hash_seconds": round(hash_s, 2),
        "cpu_seconds": {"header_scan": round(CPU["scan[]"], 2),
                        "header_scan_single_process": round(CPU["scan[('workers', 1)]"], 2),
                        "decode_scan": round(CPU["scan[('decode', True)]"], 2),
                        "content_hash": round(CPU["content_hash[]"], 2)},
        "tokenizer_load_seconds": round(tokenizer_s, 2),
        "header_scan_target_seconds": 15,
        "meets_target": header_s < 15,
        "tokenizer": header.tokenizer,
        "page_cache": "warm (files read once before timing)",
        "cpu_count": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "dermkohya": __version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
