"""The manifests, as typed records (records.py): what render, train and collect each write down.

- `RunManifest`       runs/<run>/manifest.json       (render: everything the run will use; no clocks, committed)
- `LaunchManifest`    output/<run>/manifest.json     (train: the run manifest + base sha256, command, times, state)
- `ArtifactManifest`  artifacts/<run>/manifest.json  (collect: the launch manifest + what was filed and checked)
- `TIManifest`        output/<run>/ti-manifest.json  (train, textual inversion: tokens, phases, embeddings, derived base)

Each stage's record extends the previous one's, so a later file holds every fact of an earlier one and a
reader finds each fact under one name. Parts that are open-ended by nature (the run-file dump, counts
tables, kohya's hyperparameters) are typed dicts; everything collect, the card or the queue reads is a field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from dermkohya.records import Record, RecordError

Counts = dict[str, dict[str, int]]  # diagnosis → skin type → images


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Network(_Part):
    module: str
    dim: int
    alpha: float


class SdScripts(_Part):
    path: str | None
    commit: str | None
    pinned_commit: str


class BaseModelPart(_Part):
    spec: str
    path: str
    expected_sha256: str | None
    sha256: str | None  # filled by train (render never hashes big files)
    verified: bool
    smoke: bool
    derived_from: str | None = None  # ti_then_lora: the base the textual-inversion tokens were added to


class Dataset(_Part):
    train_data_dir: str
    prepared: str | None
    content_hash: str
    counts: Counts
    images: int
    effective_samples: int  # images × repeats, per epoch
    effective_counts: Counts | None
    caption_template: str | None
    skin_types: list[str]
    trigger_words: list[str] | None = None  # ti_then_lora: the learned token strings


class Stopped(_Part):
    cause: str
    signal: str | None = None
    message: str | None = None


class Timing(_Part):
    dermkohya_before_launch_s: float
    checks_finished_after_launch_s: float | None
    kohya_first_step_after_launch_s: float | None
    kohya_held_back_s: float


class GpuOverride(_Part):
    gpu_ids: str
    run_file_gpu_ids: str | None
    by: str


class RunManifest(Record):
    """runs/<run>/manifest.json: written by `dermkohya render`, deterministic (a golden file in tests)."""

    KIND: ClassVar[str] = "run-manifest"
    REMEDY: ClassVar[str] = "run `dermkohya render RUN` to rewrite it"

    run_name: str
    run_file: str
    run_file_sha256: str
    dermkohya_version: str
    family: str
    script: str
    spec: dict[str, Any]  # the validated run file, as spec.py dumps it
    network: Network
    train: dict[str, Any]  # [train] of the run file + resolution
    sd_scripts: SdScripts
    base_model: BaseModelPart
    dataset: Dataset
    sample_prompts: list[str]
    rendered_sha256: dict[str, str]
    launch_args: list[str]
    script_args: list[str]

    @property
    def description(self) -> str:
        return str(self.spec.get("description") or "")


class LaunchManifest(RunManifest):
    """output/<run>/manifest.json: written by `dermkohya train` before the launch (state running) and after."""

    KIND: ClassVar[str] = "launch-manifest"
    REMEDY: ClassVar[str] = (
        "written by an older dermkohya or not by `dermkohya train`: re-run `dermkohya train RUN --new`, "
        "or collect it with the dermkohya version that trained it"
    )

    command: list[str]
    resumed_from: str | None = None
    gpu_override: GpuOverride | None = None
    started: str | None = None
    checked_while_kohya_starts: list[str] = []
    state: str | None = None
    finished: str | None = None
    exit_code: int | None = None
    interrupted: bool | None = None
    kohya_seconds: float | None = None
    timing: Timing | None = None
    outputs: list[str] = []
    loss_last: float | None = None
    stopped: Stopped | None = None
    textual_inversion: dict[str, Any] | None = None  # ti_then_lora: tokens, embeddings, derived base (ti.py)


class CandidateCheck(_Part):
    file: str
    checkpoint: str
    ok: bool
    problems: list[str]


class CollectPart(_Part):
    collected_at: str
    dermkohya_version: str
    version: int
    source: dict[str, str]  # file, checkpoint, sha256
    artifact: dict[str, Any]  # file, sha256, size_bytes, sshs_model_hash, tensor_sha256, hash_ok
    lora: dict[str, Any]  # lora.LoraInfo.to_dict() without path and metadata
    modules: list[str]
    candidates: list[CandidateCheck]
    samples: dict[str, Any]  # the grid's cells, rows, columns, layout
    checklist: list[dict[str, Any]]  # LORA-FINE: letter, item, ticked, evidence


class ArtifactManifest(LaunchManifest):
    """artifacts/<run>/manifest[-vN].json: written by `dermkohya collect` beside the filed LoRA."""

    KIND: ClassVar[str] = "artifact-manifest"
    REMEDY: ClassVar[str] = "run `dermkohya collect RUN` to file the run again (a new version with --new-version)"

    collect: CollectPart


class TIToken(_Part):
    token: str
    diagnosis: str
    fst: str | None  # None for token_scope = "diagnosis"
    images: int


class TIPhase(_Part):
    label: str
    token: str | None  # None for the LoRA phase
    exit_code: int
    interrupted: bool = False
    kept: bool = False  # a phase-1 run of an earlier launch whose embedding a --resume kept
    output: str | None
    log: str | None
    rendered_sha256: str  # of the phase's rendered files: a kept phase-1 embedding must come from the same ones


class TIEmbedding(_Part):
    path: str
    sha256: str
    rendered_sha256: str  # the phase-1 files it was trained from (a --resume keeps it only while they are unchanged)


class DerivedBasePart(_Part):
    path: str
    tokenizer_cache_dir: str
    text_encoder_tokenizer_sha256: str
    token_ids: dict[str, list[int]]


class TIManifest(Record):
    """output/<run>/ti-manifest.json: written by `dermkohya train` for a textual-inversion run after each phase."""

    KIND: ClassVar[str] = "ti-manifest"
    REMEDY: ClassVar[str] = (
        "written by an older dermkohya or not by `dermkohya train`: re-run `dermkohya train RUN --new` (the "
        "old outputs are kept as output/<run>.N)"
    )

    run_name: str
    method: str  # textual_inversion | ti_then_lora
    textual_inversion: dict[str, Any]  # the run file's [textual_inversion], as spec.py dumps it
    init_word: str | None
    tokens: list[TIToken]
    returncode: int = 0
    finished: bool = False  # every phase of the method ended with exit code 0
    phases: list[TIPhase] = []  # this launch's phases, in order (a kept phase-1 run is listed as kept)
    embeddings: dict[str, TIEmbedding] = {}  # token → kohya's phase-1 file
    derived_base: DerivedBasePart | None = None


def launch_from(run: RunManifest | dict[str, Any], **launch: Any) -> dict[str, Any]:
    """The launch manifest's data for a rendered run: its facts plus `launch`'s (validated when written)."""
    data = run.model_dump(mode="json") if isinstance(run, RunManifest) else dict(run)
    return data | {"format": LaunchManifest.format_id()} | launch


class LaunchStatus(BaseModel):
    """The few facts status readers (runstate, queue) take from a launch or artifact manifest."""

    model_config = ConfigDict(extra="ignore")

    started: str | None = None
    state: str | None = None
    exit_code: int | None = None
    interrupted: bool | None = None
    loss_last: float | None = None
    kohya_seconds: float | None = None


def launch_status(path: Path) -> LaunchStatus | None:
    """How the launch of a launch (or artifact) manifest stands; None when there is no readable one.

    Status readers must never fail a listing on one run's file, so unlike `LaunchManifest.read` this does not
    raise: a versioned file is read through its record (an invalid one counts as missing), and a file from
    before records (no `format`) still gives the status keys it always held, so older runs keep their state.
    """
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    record: type[Record] | None = {LaunchManifest.format_id(): LaunchManifest,
                                   ArtifactManifest.format_id(): ArtifactManifest}.get(raw.get("format"))  # fmt: skip
    if record is not None:
        try:
            return LaunchStatus.model_validate(record.from_data(raw, source=path).model_dump())
        except RecordError:
            return None
    if "format" in raw:
        return None  # another record, or a newer dermkohya's
    try:
        return LaunchStatus.model_validate(raw)  # written before manifests were records
    except ValueError:
        return None
