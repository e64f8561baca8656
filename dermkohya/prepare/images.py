"""Images: decode, orient, RGB, resize/crop, strip metadata; or a hard link when nothing would change.
Runs in worker processes; a failure is returned as a reason, never raised (except a full disk)."""

from __future__ import annotations

import errno
import io
import math
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

_HARMLESS_INFO = {
    "JPEG": {"jfif", "jfif_version", "jfif_unit", "jfif_density", "dpi", "progressive", "progression", "adobe",
             "adobe_transform"},
    "PNG": {"dpi"},
}
_SRGB = ImageCms.createProfile("sRGB")


@dataclass(frozen=True)
class ImageJob:
    source: str
    target: str
    size: tuple[int, int]
    resize: str
    quality: int


def prepare_image(job: ImageJob) -> tuple[str, str | None]:
    """('linked' | 'copied' | 'written' | 'upscaled', None) or ('failed', why). Runs in worker processes."""
    target = Path(job.target)
    want = "PNG" if target.suffix == ".png" else "JPEG"
    try:
        with Image.open(job.source) as img:
            orientation = img.getexif().get(0x0112, 1)
            width, height = img.size
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            scale = _scale((width, height), job.size, job.resize)
            untouched = (img.format == want and img.mode == "RGB" and orientation == 1 and scale is None
                         and set(img.info) <= _HARMLESS_INFO.get(want, set()))
            if untouched:
                return _link(Path(job.source), target), None
            if scale is not None and scale < 1 and img.format == "JPEG":
                raw = img.size
                img.draft("RGB", (math.ceil(raw[0] * scale), math.ceil(raw[1] * scale)))
            img.load()
            out = _to_rgb(ImageOps.exif_transpose(img) if orientation != 1 else img)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # the target's disk, not the image (a copy for a link)
            raise
        return "failed", f"cannot be read as an image ({exc})"
    if scale is not None:
        out = _resize(out, job.size, job.resize)
    if want == "PNG":
        out.save(target, "PNG", compress_level=4)
    else:
        out.save(target, "JPEG", quality=job.quality, subsampling=0)
    return ("upscaled" if scale is not None and scale > 1 else "written"), None


def _scale(size: tuple[int, int], goal: tuple[int, int], policy: str) -> float | None:
    """The resize factor the policy asks for, or None when the size stays."""
    w, h = size
    if policy == "crop":
        s = max(goal[0] / w, goal[1] / h)
        return None if (w, h) == goal else s
    if policy == "fit":
        s = min(goal[0] / w, goal[1] / h)
        return None if s >= 1 else s
    return None


def _resize(img: Image.Image, goal: tuple[int, int], policy: str) -> Image.Image:
    """Area averaging (Pillow's box filter) to shrink and Lanczos to enlarge, the defaults kohya itself
    resizes with (library/utils.py resize_image)."""
    w, h = img.size
    if policy == "fit":
        s = min(goal[0] / w, goal[1] / h)
        return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BOX)
    s = max(goal[0] / w, goal[1] / h)  # centre crop of the goal's aspect, then scale
    cw, ch = goal[0] / s, goal[1] / s
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    return img.resize(goal, Image.Resampling.BOX if s <= 1 else Image.Resampling.LANCZOS, box=box)


def _to_rgb(img: Image.Image) -> Image.Image:
    """sRGB pixels without metadata: colour profiles applied (phone photos are often Display P3),
    transparency flattened onto white, 16-bit scaled rather than clipped."""
    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "CMYK"):
        try:
            converted = ImageCms.profileToProfile(img, ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB,
                                                  outputMode="RGB")
            if converted is not None:
                img = converted
        except (ImageCms.PyCMSError, OSError):
            pass
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    out = img if img.mode == "RGB" else img.convert("RGB")
    out.info = {}  # EXIF, XMP, comments, text chunks, the applied profile: nothing of the source's metadata
    return out


def _link(source: Path, target: Path) -> str:
    try:
        os.link(source, target)
        return "linked"
    except OSError:  # another file system, or links not permitted
        shutil.copyfile(source, target)
        return "copied"


def run_jobs(jobs: list[ImageJob], workers: int, progress: Callable[[int, int], None] | None) -> list[tuple[str, str | None]]:
    if workers <= 1 or len(jobs) < 64:
        results = []
        for i, job in enumerate(jobs):
            results.append(prepare_image(job))
            if progress:
                progress(i + 1, len(jobs))
        return results
    chunk = max(1, min(64, len(jobs) // (workers * 8)))
    results = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(prepare_image, jobs, chunksize=chunk):
            results.append(result)
            if progress and (len(results) % chunk == 0 or len(results) == len(jobs)):
                progress(len(results), len(jobs))
    return results


def workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
