"""Disk and files: full disks (a small tmpfs), read-only folders (a read-only bind mount: the tests run as
root, which chmod does not stop), files that change or vanish while dermkohya works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from dermkohya import dataset, train

from _layouts import generic

from .project import Project, refused, succeeded
from .registry import case

A = "disk and files"


def _mount(args: list[str]) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} is not allowed here: {done.stderr.strip()}")


@contextmanager
def mounted(project: Project, relative: str, *, tmpfs_kib: int | None = None, read_only: bool = False) -> Iterator[Path]:
    """`relative` as a full-able tmpfs of `tmpfs_kib` KiB, or as a read-only bind mount of itself. Before the
    unmount the user's files are checked (those on a tmpfs vanish with it)."""
    folder = project.root / relative
    folder.mkdir(parents=True, exist_ok=True)
    if tmpfs_kib is not None:
        _mount(["-t", "tmpfs", "-o", f"size={tmpfs_kib}k", "tmpfs", str(folder)])
    else:
        _mount(["--bind", str(folder), str(folder)])
    try:
        if read_only:
            _mount(["-o", "remount,ro,bind", str(folder)])
        yield folder
        if project.sums is not None:
            project.verify()
    finally:
        subprocess.run(["umount", str(folder)], check=True)
    if project.sums is not None and tmpfs_kib is not None:
        project.sums = {p: d for p, d in project.sums.items() if not p.startswith(relative.rstrip("/") + "/")}


def fill(folder: Path) -> None:
    """Fill the file system of `folder` to the last byte."""
    with open(folder / ".filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass


def finished_run(project: Project) -> None:
    """output/tiny/ as `dermkohya train --no-collect` leaves a finished run (launch manifest and the LoRA)."""
    prepared = train.prepare_launch(Path("runs/tiny.toml"), project_root=project.root, overlap=False)
    out = project.root / "output/tiny"
    out.mkdir(parents=True, exist_ok=True)
    manifest = prepared.manifest | {"state": "finished", "exit_code": 0, "started": "2026-11-30T10:00:00+00:00"}
    (out / "manifest.json").write_text(json.dumps(manifest))
    shutil.copyfile(project.lora, out / "tiny.safetensors")


@case("disk-full-kohya-save", A, "the disk fills while kohya saves the LoRA (`OSError: [Errno 28] No space left on device`)",
      "exit 1; the hint says the disk is full, where kohya writes, and that --resume continues from the last complete state")
def _(project: Project) -> None:
    project.freeze()
    with mounted(project, "output", tmpfs_kib=1024):
        ran = project.cli("train", "runs/tiny.toml", process=True)
        refused(ran, "No space left on device", "hint: the disk is full", "--resume", code=1)
        assert not (project.root / "artifacts/tiny").exists()


@case("disk-full-collect", A, "the disk fills while `collect` copies the LoRA into artifacts/",
      "one line naming artifacts/<run>/ and the fix; no partial file is left; exit 1")
def _(project: Project) -> None:
    finished_run(project)
    project.freeze()
    with mounted(project, "artifacts", tmpfs_kib=512) as artifacts:
        refused(project.cli("collect", "tiny"), "artifacts/tiny: No space left on device while collecting tiny.safetensors",
                "make room there", code=1)
        assert [p.name for p in artifacts.rglob("*") if p.is_file()] == []


@case("disk-full-prepare", A, "the disk fills while `prepare` writes the prepared dataset",
      "one line naming the dataset folder and the fix (was a 76-line traceback from the worker pool); nothing half-written is left")
def _(project: Project) -> None:
    with mounted(project, "datasets/derm", tmpfs_kib=8192) as folder:
        layout = generic(folder, {"I": 32, "II": 32})  # 64 images: prepare's worker pool writes them
        project.freeze()
        fill(folder)
        refused(project.cli("prepare", str(layout.recipe.relative_to(project.root))), "datasets/derm: no space left on device",
                "free space on that disk", code=1)
        assert not (folder / "prepared").exists() and not (folder / ".prepared.tmp").exists()
        os.remove(folder / ".filler")


@case("disk-full-before-train", A, "`train` on a disk that is already full",
      "refuses before launch: names output/<run>/ and says to free space there; no traceback")
def _(project: Project) -> None:
    project.freeze()
    with mounted(project, "output", tmpfs_kib=64) as output:
        fill(output)
        refused(project.cli("train", "runs/tiny.toml"), "output/tiny: No space left on device while writing manifest.json",
                "free space there", code=1)
        os.remove(output / ".filler")


@case("output-read-only", A, "output/ on a read-only file system",
      "refuses before launch: names output/ and says to make it writable; kohya never starts")
def _(project: Project) -> None:
    project.freeze()
    with mounted(project, "output", read_only=True):
        refused(project.cli("train", "runs/tiny.toml"), "output is on a read-only file system", "make it writable", code=1)


@case("dataset-read-only", A, "the dataset on a read-only file system (a shared, mounted archive)",
      "works: dermkohya and kohya only read the dataset; nothing is written into it")
def _(project: Project) -> None:
    project.freeze()
    with mounted(project, "data", read_only=True):
        succeeded(project.cli("train", "runs/tiny.toml"), "trained", "collected")


@case("dataset-vanishes-before-launch", A, "dataset files deleted or changed while `train` checks them (another job, a sync)",
      "refuses before launch: names the dataset folder and the first changed file; kohya never starts")
def _(project: Project) -> None:
    project.freeze()
    real = dataset.scan
    victim = project.root / "data/1_derm/1.png"
    moved = project.tmp / "1.png"

    def scan_while_another_job_deletes(*args: object, **kwargs: object) -> object:
        report = real(*args, **kwargs)
        shutil.move(victim, moved)
        return report

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dataset, "scan", scan_while_another_job_deletes)
        ran = project.cli("train", "runs/tiny.toml")  # in this process, where the deletion is timed
    shutil.move(moved, victim)
    refused(ran, "data: 1 file(s) changed or vanished while train checked them (first: 1_derm/1.png)", "train again", code=1)
    assert not (project.root / "output/tiny").exists()


@case("dataset-changed-after-render", A, "the dataset changed after `render` (a caption edited before `train`)",
      "train checks and renders again, so what kohya trains and what the manifest records agree (the new content "
      "hash); a --resume refuses instead (resume-changed-dataset)")
def _(project: Project) -> None:
    succeeded(project.cli("render", "runs/tiny.toml"))
    rendered = json.loads((project.root / "runs/tiny/manifest.json").read_text())["dataset"]["content_hash"]
    project.write("data/1_derm/1.txt", "clinical dermatology photograph, eczema")
    project.freeze()
    launching = train.prepare_launch(Path("runs/tiny.toml"), project_root=project.root)  # all of train up to the launch
    launched = launching.manifest["dataset"]["content_hash"]
    assert launched != rendered and launched == dataset.content_hash(project.root / "data")
    assert json.loads((project.root / "runs/tiny/manifest.json").read_text())["dataset"]["content_hash"] == launched


@case("disk-full-generate", A, "the disk fills while `generate` stages its images (a tiny random SD pipeline on the CPU)",
      "one line naming the output folder, saying the finished images are kept and a rerun continues; no traceback")
def _(project: Project) -> None:
    pytest.importorskip("diffusers")
    from test_generate import build_tiny_sd

    model = build_tiny_sd(project.tmp / "tiny-sd", project.tmp / "tokenizers")
    project.write("plans/p.toml", f'[model]\nbase = "{model}"\n[classes]\ndiagnoses = ["melanoma"]\nskin_types = ["I"]\n'
                  "count = 12\n[sampler]\nsteps = 2\nwidth = 32\nheight = 32\n[engine]\nbatch_size = 2\n[filter]\nenabled = false\n")
    project.freeze()
    with mounted(project, "synthetic", tmpfs_kib=256) as synthetic:
        fill(synthetic)
        with open(synthetic / ".filler", "r+b") as filler:  # room for plan.json and about two staged images
            filler.truncate(max(0, os.path.getsize(synthetic / ".filler") - 5 * 4096))
        ran = project.cli("generate", "plans/p.toml", "--no-progress")
        refused(ran, "synthetic/p: No space left on device while generate wrote there", "finished images are kept",
                "run generate again to continue", code=1)
        os.remove(synthetic / ".filler")
