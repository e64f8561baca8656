"""Writing files so that a reader never sees half of one: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` in one rename; the file gets the usual permissions (0644 under umask 022)."""
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def private_temp(folder: Path, name: str, suffix: str) -> Path:
    """A new empty temporary file in `folder` (for writers that need a path), with the usual permissions."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask is process-wide, so reading it per call races between threads


def _umask() -> int:
    return _UMASK


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (a 4 GB checkpoint never sits in memory)."""
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def atomic_folder(dest: Path, build: Callable[[Path], None]) -> Path:
    """Build into a sibling temp folder and rename it into place, so a half-built model is never seen
    and two concurrent builders end with one complete copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        try:
            tmp.rename(dest)
        except OSError:
            if not dest.exists():
                raise  # another builder did not win the race: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
