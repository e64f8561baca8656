"""Bake LoRAs into a base checkpoint, or change a LoRA's rank, with sd-scripts' own scripts.

`merge` runs `networks/merge_lora.py` (SD 1.5) or `networks/sdxl_merge_lora.py` (SDXL); `resize` runs
`networks/resize_lora.py`. Both run in kohya's Python, as argv lists, then dermkohya checks the result
(header, key count, finite weights), records what went in as `dermkohya.*` metadata and a `.json`
beside it, and moves it into place without replacing anything.

kohya's merge scripts read only single-file checkpoints (.safetensors/.ckpt). A diffusers-folder SD 1.5
base (such as the smoke model) is first converted with kohya's `tools/convert_diffusers20_original_sd.py`
into a temporary file; an SDXL diffusers folder must be converted by the user first.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dermkohya import __version__, kohya, lora
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.files import write_atomic

MERGE_SCRIPTS = {"sd15": "networks/merge_lora.py", "sdxl": "networks/sdxl_merge_lora.py"}
CONVERT_SCRIPT = "tools/convert_diffusers20_original_sd.py"
RESIZE_SCRIPT = "networks/resize_lora.py"
PRECISIONS = ("float", "fp16", "bf16")
# prefixes every single-file checkpoint of the family holds (U-Net, text encoder(s), VAE)
_CHECKPOINT_PREFIXES = {
    "sd15": ("model.diffusion_model.", "cond_stage_model.transformer.", "first_stage_model."),
    "sdxl": ("model.diffusion_model.", "conditioner.embedders.0.", "conditioner.embedders.1.", "first_stage_model."),
}


def parse_lora_arg(text: str) -> tuple[Path, float]:
    """`FILE` or `FILE:WEIGHT` (weight 1.0 when omitted)."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return Path(path), float(weight)
        except ValueError:
            pass
    return Path(text), 1.0


def _check_output(out: Path) -> Path:
    out = Path(out)
    if out.suffix != ".safetensors":
        raise DermkohyaError(f"{out}: write the result as .safetensors (kohya would pickle anything else)")
    if out.exists():
        raise DermkohyaError(f"{out}: already exists and is never replaced; choose another output name")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _run(argv: list[str], sd_scripts: Path, log_path: Path, what: str, on_line: Callable[[str], None] | None) -> None:
    """kohya's script from its own folder; `library` importable as it is for train_network.py."""
    env = kohya.kohya_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(sd_scripts), env.get("PYTHONPATH", "")) if p)
    result = kohya.launch(argv, cwd=sd_scripts, log_path=log_path, env=env, on_line=on_line)
    if result.returncode != 0:
        tail = "\n".join(f"    {line}" for line in result.tail[-12:])
        raise DermkohyaError(f"{what} failed (exit {result.returncode}); full log {log_path}; last lines:\n{tail}")


def _lora_record(path: Path, info: lora.LoraInfo, weight: float | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "file": path.name,
        "sha256": lora.file_sha256(path),
        "sshs_model_hash": info.recorded_hash,
        "rank": info.rank if info.rank is not None else info.ranks,
        "alpha": info.alpha if info.alpha is not None else info.alphas,
        "run_name": info.metadata.get("dermkohya.run_name"),
    }
    if weight is not None:
        record["weight"] = weight
    return record


def _checked_loras(loras: Sequence[tuple[Path, float]]) -> tuple[list[lora.LoraInfo], str | None]:
    """Every input LoRA verified (readable, kohya names, finite, hash intact) and of one family."""
    infos, problems = [], []
    for path, _ in loras:
        try:
            info = lora.describe(Path(path))
        except DermkohyaError as exc:
            problems.append(str(exc))
            continue
        problems += [f"{path}: {p}" for p in lora.kohya_problems(info)]
        infos.append(info)
    if problems:
        raise ProblemsError("LoRAs to merge (fix or drop them)", problems)
    families = {i.family for i in infos if i.family}
    if len(families) > 1:
        raise DermkohyaError(f"the LoRAs are of different families ({', '.join(sorted(families))}): merge one family at a time")
    return infos, families.pop() if families else None


def _publish(src: Path, out: Path, metadata: dict[str, str], record: dict[str, Any]) -> None:
    """Add `dermkohya.*` keys (header rewrite), then link into place (fails rather than replace)."""
    sf = lora.read_header(src)
    final = src.with_name(src.stem + ".final.safetensors")
    lora.write_with_metadata(sf, {**sf.metadata, **metadata}, final)
    record["sha256"] = lora.file_sha256(final)
    sidecar = out.with_name(out.name + ".sha256")
    if not sidecar.exists():
        sidecar.write_text(f"{record['sha256']}  {out.name}\n", encoding="utf-8")
    write_atomic(out.with_suffix(".json"), json.dumps(record, indent=2, sort_keys=True) + "\n")  # a reader never sees half a record
    lora.publish(final, out)


def _changed_tensors(base: Path, merged: Path) -> int:
    """How many tensors differ from the base: 0 means the LoRAs changed nothing (or the weights were 0)."""
    a, b = lora.read_header(base), lora.read_header(merged)
    changed = 0
    with merged.open("rb") as f:
        for entry, raw in lora.iter_tensors(a):
            other = b.tensors.get(entry.name)
            if other is None:
                continue
            f.seek(b.data_offset + other.start)
            if other.dtype != entry.dtype or f.read(other.end - other.start) != raw:
                changed += 1
    return changed


def merge(
    base: Path,
    loras: Sequence[tuple[Path, float]],
    out: Path,
    *,
    precision: str = "float",
    save_precision: str | None = None,
    on_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Bake `loras` (path, weight) into `base` with kohya's merge script; returns the record written beside `out`."""
    from dermkohya import basemodel

    if not loras:
        raise DermkohyaError("give at least one LoRA to merge (--lora FILE[:WEIGHT])")
    if precision not in PRECISIONS or save_precision not in (None, *PRECISIONS):
        raise DermkohyaError(f"precision must be one of {', '.join(PRECISIONS)}")
    out = _check_output(out)
    infos, family = _checked_loras(loras)
    resolved = basemodel.resolve_base(str(base), Path.cwd())  # the resolver train and generate use
    if resolved.smoke:
        basemodel.ensure_smoke_model(str(resolved.family), seed=basemodel.SMOKE_SEED, cache_root=basemodel.models_dir(Path.cwd()))
    base = resolved.path
    identity = {"format": resolved.format, "family": resolved.family, "smoke": resolved.smoke}
    if identity["family"] not in MERGE_SCRIPTS:
        raise DermkohyaError(f"{base}: base model family {identity['family'] or 'unknown'}; kohya's merge supports SD 1.5 and SDXL")
    if family and identity["family"] != family:
        raise DermkohyaError(f"{base}: an {identity['family']} base, but the LoRAs are {family}: use a matching base")
    family = identity["family"]
    if identity["format"] == "diffusers" and family == "sdxl":
        raise DermkohyaError(
            f"{base}: an SDXL diffusers folder; kohya's sdxl_merge_lora.py reads single-file checkpoints only. "
            "Convert it to one .safetensors file first and pass that as --base"
        )
    sd_scripts, python = kohya.find_sd_scripts(), kohya.find_python()
    log_path = out.with_suffix(".merge.log")
    record: dict[str, Any] = {
        "kind": "merge",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dermkohya_version": __version__,
        "sd_scripts_commit": kohya.sd_scripts_commit(sd_scripts),
        "script": MERGE_SCRIPTS[family],
        "family": family,
        "base": {"file": Path(base).name, "format": identity["format"], "sha256": basemodel.sha256_path(Path(base)),
                 "smoke": identity["smoke"]},  # fmt: skip
        "loras": [_lora_record(Path(p), i, w) for (p, w), i in zip(loras, infos)],
        "warnings": [resolved.warning] if resolved.warning else [],
        "precision": precision,
        "save_precision": save_precision or precision,
    }
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as work:
        checkpoint = Path(base).resolve()
        if identity["format"] == "diffusers":
            checkpoint = Path(work) / "base.safetensors"
            convert = [str(python), CONVERT_SCRIPT, "--v1", "--save_precision_as", save_precision or precision,
                       str(Path(base).resolve()), str(checkpoint)]  # fmt: skip
            _run(convert, sd_scripts, log_path, f"converting the diffusers folder {base} to a checkpoint", on_line)
            record["base"]["converted_with"] = convert[1:]
        merged = Path(work) / "merged.safetensors"
        argv = [str(python), MERGE_SCRIPTS[family], "--sd_model", str(checkpoint), "--save_to", str(merged),
                "--precision", precision, "--models", *[str(Path(p).resolve()) for p, _ in loras],
                "--ratios", *[repr(float(w)) for _, w in loras]]  # fmt: skip
        if save_precision:
            argv += ["--save_precision", save_precision]
        _run(argv, sd_scripts, log_path, f"kohya's {MERGE_SCRIPTS[family]}", on_line)
        record["command"] = argv[1:]
        record["verified"] = _verify_checkpoint(merged, checkpoint, family)
        record["verified"]["changed_tensors"] = _changed_tensors(checkpoint, merged) if checkpoint.suffix == ".safetensors" else None
        metadata = {
            "dermkohya.merge": json.dumps({k: v for k, v in record.items() if k != "verified"}, sort_keys=True),
            "dermkohya.merged_loras": json.dumps([{"file": r["file"], "weight": r["weight"], "sha256": r["sha256"]}
                                                  for r in record["loras"]]),  # fmt: skip
            "dermkohya.version": __version__,
        }
        _publish(merged, out, metadata, record)
    return record


def _verify_checkpoint(merged: Path, base: Path, family: str) -> dict[str, Any]:
    """The merged file parses, has the family's parts and the base's key count, and holds finite weights."""
    try:
        sf = lora.read_header(merged)
    except DermkohyaError as exc:
        raise DermkohyaError(f"kohya's merge wrote an unreadable checkpoint: {exc}") from None
    problems = []
    missing = [p for p in _CHECKPOINT_PREFIXES[family] if not any(k.startswith(p) for k in sf.tensors)]
    if missing:
        problems.append(f"no tensors under {', '.join(missing)}")
    base_keys = len(lora.read_header(base).tensors) if base.suffix == ".safetensors" else None
    if base_keys is not None and len(sf.tensors) != base_keys:
        problems.append(f"{len(sf.tensors)} tensors, the base has {base_keys}")
    scan = lora.scan(sf)
    if scan.non_finite:
        problems.append(f"{len(scan.non_finite)} tensor(s) hold NaN/Inf, e.g. {scan.non_finite[0]}: lower the LoRA weights")
    if problems:
        raise ProblemsError(f"merged checkpoint {merged}", problems)
    return {"tensors": len(sf.tensors), "base_tensors": base_keys, "finite": True}


def resize(
    source: Path,
    new_rank: int,
    out: Path,
    *,
    save_precision: str | None = None,
    dynamic_method: str | None = None,
    dynamic_param: float | None = None,
    on_line: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Change a LoRA's rank with kohya's resize_lora.py (SVD); the result is verified like a trained LoRA."""
    if new_rank < 1:
        raise DermkohyaError(f"--rank {new_rank}: the new rank must be at least 1")
    if dynamic_method not in (None, "sv_ratio", "sv_fro", "sv_cumulative"):
        raise DermkohyaError(f"--dynamic {dynamic_method}: use sv_ratio, sv_fro or sv_cumulative")
    if save_precision not in (None, *PRECISIONS):
        raise DermkohyaError(f"precision must be one of {', '.join(PRECISIONS)}")
    out = _check_output(out)
    (info,), family = _checked_loras([(Path(source), 1.0)])
    sd_scripts, python = kohya.find_sd_scripts(), kohya.find_python()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as work:
        resized = Path(work) / "resized.safetensors"
        argv = [str(python), RESIZE_SCRIPT, "--model", str(Path(source).resolve()), "--save_to", str(resized),
                "--new_rank", str(new_rank), "--device", "cpu"]  # fmt: skip
        if save_precision:
            argv += ["--save_precision", save_precision]
        if dynamic_method:
            argv += ["--dynamic_method", dynamic_method, "--dynamic_param", str(dynamic_param)]
        _run(argv, sd_scripts, out.with_suffix(".resize.log"), f"kohya's {RESIZE_SCRIPT}", on_line)
        new_info = lora.describe(resized)
        # kohya gives an all-zero module rank 1 and caps at the old rank, so ranks are at most new_rank
        problems = lora.kohya_problems(new_info, family=family)
        if new_info.ranks and max(new_info.ranks) > new_rank:
            problems.append(f"ranks {new_info.ranks} exceed the requested {new_rank}")
        if problems:
            raise ProblemsError(f"resized LoRA from {RESIZE_SCRIPT}", problems)
        record: dict[str, Any] = {
            "kind": "resize",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dermkohya_version": __version__,
            "sd_scripts_commit": kohya.sd_scripts_commit(sd_scripts),
            "script": RESIZE_SCRIPT,
            "source": _lora_record(Path(source), info),
            "new_rank": new_rank,
            "rank": max(new_info.ranks),
            "ranks": dict(sorted(Counter(m.rank for m in new_info.modules.values()).items())),
            "alpha": new_info.alpha if new_info.alpha is not None else new_info.alphas,
            "command": argv[1:],
        }
        keep = {k: v for k, v in info.metadata.items() if k.startswith("dermkohya.")}
        _publish(resized, out, {**keep, "dermkohya.resize": json.dumps(record, sort_keys=True)}, record)
    return record
