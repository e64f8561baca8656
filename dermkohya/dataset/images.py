"""Image facts kohya cares about, from the header (always) and a full decode (on request).

Plain data in and out, so the work can go to a process pool: a worker returns each image's sha256 and
its problems as (code, message, severity override) tuples, and the checker turns them into Problems.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

# Pillow refuses images above twice this many pixels (DecompressionBombError) and warns above it.
BOMB_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
_EXPECTED_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}

Job = tuple[str, bool, tuple[int, int]]  # (path, decode fully, training resolution)


def _looks_truncated(data: bytes, image_format: str | None) -> bool:
    tail = data.rstrip(b"\0\r\n ")
    if image_format == "JPEG":
        return not tail.endswith(b"\xff\xd9")
    if image_format == "PNG":
        return b"IEND" not in tail[-16:]
    return False


def _orientation(exif_block: object) -> int:
    """The EXIF orientation tag from the block read with the header (Image.getexif() would decode a PNG)."""
    if not isinstance(exif_block, bytes):
        return 1
    exif = Image.Exif()
    try:
        exif.load(exif_block)
        return int(exif.get(0x0112, 1) or 1)
    except Exception:  # a malformed EXIF block is not worth stopping the scan for
        return 1


def _inspect_image(path: str, decode: bool, resolution: tuple[int, int]) -> dict[str, Any]:
    """Facts and problems of one image, as plain data so a worker process can return it."""
    facts: dict[str, Any] = {"path": path, "sha256": None, "problems": []}
    problems: list[tuple[str, str, str | None]] = facts["problems"]  # (code, message, severity override)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        problems.append(("unreadable-image", f"cannot be read: {exc.strerror or exc}", None))
        return facts
    facts["sha256"] = hashlib.sha256(data).hexdigest()
    if not data:
        problems.append(("unreadable-image", "is empty (0 bytes)", None))
        return facts
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # sizes are judged below, not refused
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        problems.append(("unreadable-image", f"is not an image Pillow can open ({exc})", None))
        return facts
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    with image:
        width, height = image.size
        fmt, mode = image.format, image.mode
        facts.update(width=width, height=height, format=fmt, mode=mode)
        suffix = os.path.splitext(path)[1].lower()
        expected = _EXPECTED_FORMAT.get(suffix)
        if expected and fmt != expected:
            problems.append(("format-mismatch", f"is a {fmt} file named {suffix}", None))
        pixels = width * height
        if pixels > 2 * BOMB_PIXELS:
            problems.append(("decompression-bomb", f"is {width}×{height} ({pixels:,} pixels): Pillow refuses "
                             f"more than {2 * BOMB_PIXELS:,}", None))
            return facts
        if pixels > BOMB_PIXELS:
            problems.append(("huge-image", f"is {width}×{height} ({pixels:,} pixels)", None))
        if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            problems.append(("bit-depth", f"is {mode} greyscale: converting it to RGB clips every value above 255 "
                             "(the image trains as near-white)", "error"))
        elif fmt == "PNG" and len(data) > 24 and data[24] == 16:
            problems.append(("bit-depth", f"is a 16-bit-per-channel {mode} PNG", None))
        if mode == "CMYK":
            problems.append(("cmyk", "is CMYK", None))
        if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
            problems.append(("alpha-channel", f"has transparency (mode {mode})", None))
        orientation = _orientation(image.info.get("exif"))
        if orientation not in (None, 1):
            turn = {2: "mirrored", 3: "rotated 180°", 4: "flipped", 5: "transposed", 6: "rotated 90°",
                    7: "transversed", 8: "rotated 270°"}.get(orientation, f"orientation {orientation}")
            problems.append(("exif-rotation", f"has EXIF orientation {orientation} ({turn}): kohya trains the "
                             "stored pixels", None))
        if pixels < resolution[0] * resolution[1]:
            problems.append(("too-small", f"is {width}×{height}, below the training resolution "
                             f"{resolution[0]}×{resolution[1]}", None))
        if decode or _looks_truncated(data, fmt):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    image.load()
            except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for broken data
                problems.append(("unreadable-image", f"does not decode ({exc})", None))
    return facts


def _inspect_chunk(jobs: list[Job]) -> list[dict[str, Any]]:
    return [_inspect_image(*job) for job in jobs]


@contextmanager
def inspecting(jobs: list[Job], workers: int | None) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Start inspecting images in a process pool and yield a function that waits for the results, so
    the caller checks captions meanwhile. Small jobs stay in this process (a pool costs ~0.1 s)."""
    workers = workers or os.cpu_count() or 1
    if workers <= 1 or len(jobs) < 200:
        yield lambda: _inspect_chunk(jobs)
        return
    size = max(16, min(256, len(jobs) // (workers * 8)))
    chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = pool.map(_inspect_chunk, chunks)
        yield lambda: [facts for chunk in pending for facts in chunk]
