"""What the checker can find: every problem code with its severity, title and fix, and the Problem record.

One table, so the report, the JSON output and the README name each kind of problem the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Severity = Literal["error", "warning"]

# code -> (default severity, title, fix). A problem may override the fix where the run decides it.
CODES: dict[str, tuple[Severity, str, str]] = {
    "not-found": ("error", "path does not exist", "point check at the train_data_dir or dataset TOML"),
    "bad-config": ("error", "dataset TOML kohya will reject", "fix the key named in the message"),
    "no-subsets": ("error", "no folder kohya will train on", "put images in <repeats>_<concept> folders, e.g. 10_derm"),
    "folder-no-repeats": ("error", "folder name kohya will not parse", "rename it <repeats>_<concept>, e.g. 10_derm"),
    "folder-zero-repeats": ("error", "folder with repeats < 1 (kohya skips it)", "use a repeat count of 1 or more"),
    "folder-no-concept": ("warning", "folder without a concept name", "name it <repeats>_<concept>: the concept is the class token"),
    "images-in-root": ("error", "images directly in the dataset root (kohya ignores them)", "move them into a <repeats>_<concept> folder"),
    "empty-subset": ("error", "subset folder without images", "add images or remove the folder"),
    "nested-folder": ("error", "images in a nested folder (kohya does not recurse)", "move the images up into the concept folder, or make the folder its own <repeats>_<concept> subset"),
    "ignored-image": ("error", "image file kohya will not load", "convert it to .png/.jpg/.jpeg/.webp/.bmp (lower or upper case)"),
    "missing-caption": ("error", "image without a caption (kohya trains it on the class token)", "write a caption file beside it"),
    "wrong-caption-extension": ("error", "caption with the wrong extension", "rename the caption to the extension the run uses"),
    "orphan-caption": ("warning", "caption without an image", "remove it or restore its image"),
    "ignored-caption": ("warning", "second caption kohya ignores", "delete the caption with the extension the run does not use"),
    "empty-caption": ("error", "empty caption (kohya fails or trains on nothing)", "write the caption text on the first line"),
    "caption-not-utf8": ("error", "caption is not UTF-8 (kohya stops with UnicodeDecodeError)", "re-save the caption as UTF-8"),
    "caption-bom": ("warning", "caption starts with a byte-order mark", "re-save as UTF-8 without BOM: kohya keeps the mark in the first token"),
    "caption-multiline": ("warning", "caption with several lines (kohya reads the first)", "join the caption onto one line (or enable_wildcard on purpose)"),
    "caption-too-long": ("warning", "caption longer than one CLIP chunk", "shorten it to 75 tokens, or train with --max_token_length 150/225"),
    "unreadable-image": ("error", "image that does not open or decode", "re-export the image or remove it"),
    "format-mismatch": ("warning", "file content does not match its extension", "rename the file to the extension of its real format"),
    "bit-depth": ("warning", "16-bit image (kohya loads 8 bits per channel)", "convert to 8-bit RGB"),
    "cmyk": ("warning", "CMYK image (converted to RGB without a colour profile: skin tones shift)", "convert to sRGB with a colour-managed tool"),
    "alpha-channel": ("warning", "image with transparency (kohya drops alpha: hidden pixels show)", "flatten onto a background and save as RGB"),
    "exif-rotation": ("warning", "EXIF orientation kohya ignores (trained rotated/mirrored)", "rotate the pixels and drop the orientation tag (dermkohya prepare does)"),
    "too-small": ("warning", "image smaller than the training resolution (kohya upscales it)", "use a larger original or train at a lower resolution"),
    "huge-image": ("warning", "image above Pillow's pixel limit (warns, slow to load)", "downscale it before training"),
    "decompression-bomb": ("error", "image Pillow refuses to open (decompression-bomb size)", "downscale it before training"),
    "duplicate-image": ("warning", "image with the same bytes as another", "keep one copy (or raise the repeats on purpose)"),
    "stray-file": ("warning", "stray file or folder", "delete it: it is not training data"),
    "caption-extension-unset": ("warning", "dataset TOML without caption_extension", "set caption_extension = \".txt\": kohya's default is .caption"),
    "metadata-missing-image": ("warning", "metadata.csv row naming an image the dataset lacks", "fix the image column (paths relative to the dataset root)"),
    "metadata-bad-value": ("warning", "metadata.csv value not understood", "use I–VI or 1–6 for fitzpatrick"),
    "bad-metadata-file": ("error", "fine-tuning metadata_file kohya cannot use", "write JSON of the form {\"<image>\": {\"caption\": \"...\", \"tags\": \"...\"}}"),
    "metadata-key-no-image": ("error", "fine-tuning metadata key whose image does not exist (kohya stops)", "make the key the image's file name with its extension (relative to image_dir) or its absolute path"),
    "image-not-in-metadata": ("warning", "image in a fine-tuning image_dir that its metadata_file does not list (kohya skips it)", "add it to the metadata_file, or move it out of image_dir"),
    "unsupported-subset": ("warning", "dataset TOML subset dermkohya does not check", "check ControlNet (conditioning_data_dir) subsets by hand"),
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file, with the fix; the report groups them by code."""

    severity: Severity
    code: str
    path: Path
    message: str
    fix: str

    def to_dict(self, root: Path) -> dict[str, str]:
        return {"severity": self.severity, "code": self.code, "path": display(self.path, root),
                "message": self.message, "fix": self.fix}


def problem(code: str, path: Path, message: str, *, fix: str | None = None,
            severity: Severity | None = None) -> Problem:
    """A Problem with its code's severity and fix unless the caller knows better."""
    default_severity, _, default_fix = CODES[code]
    return Problem(severity or default_severity, code, path, message, fix or default_fix)


def title(code: str) -> str:
    return CODES[code][1]


def display(path: Path, root: Path) -> str:
    """A path as the report shows it: relative to the dataset root where it lies below it."""
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return str(path)
