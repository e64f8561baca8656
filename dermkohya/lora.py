"""Read, check and describe LoRA safetensors files with numpy alone (no torch).

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor names, dtypes,
shapes, byte offsets and a `__metadata__` dict of strings) and the tensor bytes. kohya's
`sshs_model_hash` is the SHA-256 of the tensor bytes alone, so dermkohya can add `dermkohya.*`
metadata by rewriting only the header (`write_with_metadata`) and the hash stays valid.

`describe(path)` is what other stages call (collect, inspect, generate): rank, alpha, modules touched,
metadata, hash check. `kohya_problems(info, ...)` lists every reason a file is not the kohya LoRA a
run should have produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermkohya.files import sha256_file
from dermkohya.tensorfile import DTYPES, MAX_HEADER_BYTES, SafetensorsFile, TensorEntry, read_header  # noqa: F401 (re-exported)
from dermkohya.errors import DermkohyaError

_CHUNK = 1024 * 1024

_FLOATS = {"F64", "F32", "F16", "BF16"}


file_sha256 = sha256_file  # the whole file: what the `.sha256` sidecar records


def _as_float_array(entry: TensorEntry, raw: bytes) -> np.ndarray | None:
    if entry.dtype == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(entry.shape)
    numpy_dtype = DTYPES[entry.dtype][1]
    return None if numpy_dtype is None else np.frombuffer(raw, numpy_dtype).reshape(entry.shape)


def iter_tensors(sf: SafetensorsFile) -> Iterator[tuple[TensorEntry, bytes]]:
    """Each tensor's raw bytes, in file order, so one sequential read serves hashing and checking."""
    with sf.path.open("rb") as f:
        f.seek(sf.data_offset)
        for entry in sf.in_file_order():
            yield entry, f.read(entry.end - entry.start)


def read_array(sf: SafetensorsFile, name: str) -> np.ndarray:
    """One tensor as a numpy array (BF16 widened to float32)."""
    entry = sf.tensors[name]
    with sf.path.open("rb") as f:
        f.seek(sf.data_offset + entry.start)
        array = _as_float_array(entry, f.read(entry.end - entry.start))
    if array is None:
        raise DermkohyaError(f"{sf.path}: tensor {name!r} is {entry.dtype}, which numpy cannot read")
    return array


@dataclass(frozen=True)
class Scan:
    """One pass over the tensor bytes: kohya's addnet hash and the tensors holding NaN or Inf."""

    data_sha256: str
    non_finite: list[str]
    unchecked: list[str]


def scan(sf: SafetensorsFile) -> Scan:
    """SHA-256 of the tensor bytes (how kohya computes `sshs_model_hash`) and a NaN/Inf check."""
    digest = hashlib.sha256()
    non_finite: list[str] = []
    unchecked: list[str] = []
    for entry, raw in iter_tensors(sf):
        digest.update(raw)
        if entry.dtype not in _FLOATS:
            if entry.dtype.startswith("F8"):
                unchecked.append(entry.name)
            continue
        array = _as_float_array(entry, raw)
        if array is not None and array.size and not np.isfinite(array).all():
            non_finite.append(entry.name)
    return Scan(digest.hexdigest(), non_finite, unchecked)


def write_with_metadata(sf: SafetensorsFile, metadata: dict[str, str], dest: Path) -> None:
    """Write `sf` to `dest` with a new `__metadata__`; the tensor bytes are copied unchanged.

    The header is padded with spaces to a multiple of 8, as safetensors itself writes it, and keys are
    sorted so the same inputs give the same bytes (a second collect can recognise its own artifact).
    """
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad}")
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    for entry in sf.in_file_order():
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [entry.start, entry.end]}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with sf.path.open("rb") as src, Path(dest).open("wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        src.seek(sf.data_offset)
        shutil.copyfileobj(src, out, _CHUNK)
        out.flush()
        os.fsync(out.fileno())


def publish(tmp: Path, dest: Path) -> None:
    """Move a finished temp file to `dest` (same folder) atomically, failing rather than replacing anything."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise DermkohyaError(f"{dest}: appeared while it was being written and is never replaced; run again") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


# ---- LoRA key names ---------------------------------------------------------------------------

# suffix → role, for kohya (`lora_down`), diffusers (`lora.down`) and PEFT (`lora_A`) files
_ROLES: tuple[tuple[str, str, str], ...] = (
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".lora_mid.weight", "mid", "kohya"),
    (".alpha", "alpha", "kohya"),
    (".dora_scale", "dora_scale", "kohya"),
    (".lora.down.weight", "down", "diffusers"),
    (".lora.up.weight", "up", "diffusers"),
    (".lora_linear_layer.down.weight", "down", "diffusers"),
    (".lora_linear_layer.up.weight", "up", "diffusers"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
)
_KOHYA_NAME = re.compile(r"^lora_(unet|te|te1|te2)_[A-Za-z0-9_]+$")
_COMPONENTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
_BLOCK = re.compile(
    r"^(?P<block>(?:down_blocks|up_blocks|input_blocks|output_blocks)_\d+|mid_block|middle_block"
    r"|text_model_encoder_layers_\d+|encoder_layers_\d+|transformer_resblocks_\d+)"
)
_TARGET = re.compile(
    r"((?:attn[12]_)?(?:to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2|proj_in|proj_out"
    r"|self_attn_(?:q|k|v|out)_proj|mlp_fc[12]|conv[12]?|conv_shortcut|time_emb_proj|(?:down|up)samplers_0_conv"
    r"|attn_(?:in|out)_proj|mlp_c_(?:fc|proj))$"
)
# kohya's base_model_version metadata → dermkohya's family names
_FAMILIES = {"sd_v1": "sd15", "sdxl_base_v1-0": "sdxl"}


@dataclass
class Module:
    """One adapted layer: which model part, which block, which layer kind, and its rank and alpha."""

    name: str
    component: str
    block: str
    target: str
    rank: int | None = None
    alpha: float | None = None
    kind: str = "linear"
    parts: dict[str, TensorEntry] = field(default_factory=dict)


def _split_key(key: str) -> tuple[str, str, str] | None:
    for suffix, role, style in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role, style
    return None


def _locate(module: str, style: str) -> tuple[str, str, str]:
    """(component, block, target) of a module name, kohya-style (`lora_unet_down_blocks_0_…`) or dotted."""
    if style == "kohya":
        prefix, _, rest = module.partition("_")[2].partition("_")
        component = _COMPONENTS.get(prefix, prefix)
    else:
        head, _, rest = module.partition(".")
        component = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}.get(head, head)
        rest = rest.replace(".", "_")
    match = _BLOCK.match(rest)
    block = match.group("block") if match else rest.split("_")[0]
    block = re.sub(r"_(\d+)$", r".\1", block.replace("text_model_encoder_layers", "layers").replace("encoder_layers", "layers"))
    block = block.replace("transformer_resblocks", "layers")
    target = _TARGET.search(rest)
    return component, block, (target.group(1) if target else "_".join(rest.split("_")[-2:]))


@dataclass
class LoraInfo:
    """What a LoRA file is: format, family, rank, alpha, modules, metadata and whether its hash holds."""

    path: Path
    size_bytes: int
    file: SafetensorsFile
    format: str
    family: str | None
    modules: dict[str, Module]
    unmatched: list[str]
    scan: Scan

    @property
    def metadata(self) -> dict[str, str]:
        return self.file.metadata

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values() if m.rank is not None})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules.values() if m.alpha is not None})

    @property
    def rank(self) -> int | None:
        return self.ranks[0] if len(self.ranks) == 1 else None

    @property
    def alpha(self) -> float | None:
        return self.alphas[0] if len(self.alphas) == 1 else None

    @property
    def recorded_hash(self) -> str | None:
        return self.metadata.get("sshs_model_hash")

    @property
    def hash_ok(self) -> bool | None:
        """True/False when kohya recorded `sshs_model_hash`, None when there is nothing to check against."""
        return None if self.recorded_hash is None else self.recorded_hash == self.scan.data_sha256

    def module_counts(self) -> dict[str, int]:
        return dict(Counter(m.component for m in self.modules.values()))

    def block_counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, Counter[str]] = {}
        for m in self.modules.values():
            out.setdefault(m.component, Counter())[m.block] += 1
        return {c: dict(sorted(b.items(), key=lambda kv: _natural(kv[0]))) for c, b in sorted(out.items())}

    def target_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(m.target for m in self.modules.values()).items()))

    def grouped_metadata(self) -> dict[str, dict[str, str]]:
        """kohya's training record (`ss_*`, `sshs_*`), Stability's `modelspec.*`, dermkohya's, and the rest."""
        groups: dict[str, dict[str, str]] = {"ss": {}, "modelspec": {}, "dermkohya": {}, "other": {}}
        for key, value in sorted(self.metadata.items()):
            group = next((g for g, p in _GROUP_PREFIXES if key.startswith(p)), "other")
            groups[group][key] = value
        return groups

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what `dermkohya inspect --json` prints)."""
        return {
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "format": self.format,
            "family": self.family,
            "tensors": len(self.file.tensors),
            "dtypes": dict(Counter(t.dtype for t in self.file.tensors.values())),
            "rank": self.rank if self.rank is not None else self.ranks,
            "alpha": self.alpha if self.alpha is not None else self.alphas,
            "modules": {"total": len(self.modules), **self.module_counts()},
            "blocks": self.block_counts(),
            "targets": self.target_counts(),
            "unmatched_tensors": self.unmatched,
            "non_finite_tensors": self.scan.non_finite,
            "hash": {
                "sshs_model_hash": self.recorded_hash,
                "computed": self.scan.data_sha256,
                "ok": self.hash_ok,
            },
            "metadata": self.grouped_metadata(),
        }


_GROUP_PREFIXES = (("ss", "ss_"), ("ss", "sshs_"), ("modelspec", "modelspec."), ("dermkohya", "dermkohya."))


def _natural(text: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def describe(path: Path, *, sf: SafetensorsFile | None = None) -> LoraInfo:
    """Parse, hash and describe a LoRA file (kohya, diffusers or PEFT names); raises only if unreadable."""
    sf = sf or read_header(Path(path))
    modules: dict[str, Module] = {}
    styles: Counter[str] = Counter()
    unmatched: list[str] = []
    for entry in sf.tensors.values():
        split = _split_key(entry.name)
        if split is None:
            unmatched.append(entry.name)
            continue
        name, role, style = split
        styles[style] += 1
        if name not in modules:
            component, block, target = _locate(name, style)
            modules[name] = Module(name, component, block, target)
        modules[name].parts[role] = entry
    for module in modules.values():
        down, up = module.parts.get("down"), module.parts.get("up")
        if down is not None and down.shape:
            module.rank = down.shape[0]
            if len(down.shape) == 4:
                module.kind = "conv1x1" if tuple(down.shape[2:]) == (1, 1) else "conv3x3"
        elif up is not None and len(up.shape) >= 2:
            module.rank = up.shape[1]
        alpha = module.parts.get("alpha")
        if alpha is not None and int(np.prod(alpha.shape, dtype=np.int64)) == 1:
            try:
                module.alpha = float(read_array(sf, alpha.name).reshape(-1)[0])
            except DermkohyaError:
                module.alpha = None
    fmt = styles.most_common(1)[0][0] if styles else "unknown"
    if len(styles) > 1:
        fmt = "mixed"
    return LoraInfo(sf.path, sf.file_size, sf, fmt, _family(sf.metadata, modules), modules, sorted(unmatched), scan(sf))


def _family(metadata: dict[str, str], modules: dict[str, Module]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    if version in _FAMILIES:
        return _FAMILIES[version]
    if version.startswith("sdxl"):
        return "sdxl"
    arch = metadata.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-xl"):
        return "sdxl"
    if arch.startswith("stable-diffusion-v1"):
        return "sd15"
    names = list(modules)
    if any(n.startswith(("lora_te1_", "lora_te2_")) or n.startswith("text_encoder_2.") for n in names):
        return "sdxl"
    if any(n.startswith("lora_unet_down_blocks_") or n.startswith("lora_te_") for n in names):
        return "sd15"
    return None


def kohya_problems(
    info: LoraInfo,
    *,
    dim: int | None = None,
    alpha: float | None = None,
    family: str | None = None,
) -> list[str]:
    """Every reason this is not a sound kohya LoRA of the given rank, alpha and family (empty: it is)."""
    problems: list[str] = []

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    if not info.modules:
        return ["no LoRA tensors (`*.lora_down.weight` / `*.lora_up.weight`): this is not a LoRA file"]
    if info.format != "kohya":
        problems.append(f"tensor names are {info.format}-style, not kohya's (`lora_unet_*.lora_down.weight`)")
    if info.unmatched:
        problems.append(f"{len(info.unmatched)} tensor(s) are not LoRA tensors: {some(info.unmatched)}")
    foreign = [n for n in info.modules if not _KOHYA_NAME.match(n)]
    if foreign and info.format == "kohya":
        problems.append(f"{len(foreign)} module name(s) are not kohya LoRA names: {some(foreign)}")
    missing = [f"{m.name} ({', '.join(sorted({'down', 'up', 'alpha'} - set(m.parts)))})"
               for m in info.modules.values() if not {"down", "up", "alpha"} <= set(m.parts)]  # fmt: skip
    if missing:
        problems.append(f"{len(missing)} module(s) lack lora_down/lora_up/alpha: {some(missing)}")
    inconsistent = []
    for m in info.modules.values():
        down, up = m.parts.get("down"), m.parts.get("up")
        if down is None or up is None:
            continue
        if len(down.shape) not in (2, 4) or len(up.shape) != len(down.shape) or up.shape[1] != down.shape[0]:
            inconsistent.append(f"{m.name} (down {list(down.shape)}, up {list(up.shape)})")
    if inconsistent:
        problems.append(f"{len(inconsistent)} module(s) have lora_up/lora_down shapes that do not chain: {some(inconsistent)}")
    if info.scan.non_finite:
        problems.append(f"{len(info.scan.non_finite)} tensor(s) hold NaN or Inf: {some(info.scan.non_finite)}")
    if info.hash_ok is False:
        problems.append(
            f"tensor bytes hash to {info.scan.data_sha256[:12]}…, not the sshs_model_hash kohya recorded "
            f"({info.recorded_hash[:12] if info.recorded_hash else ''}…): the file was altered after training"
        )
    linear_ranks = sorted({m.rank for m in info.modules.values() if m.kind != "conv3x3" and m.rank is not None})
    if dim is not None and linear_ranks != [dim]:
        problems.append(f"rank is {linear_ranks or 'unknown'} but the run's network dim is {dim}")
    if alpha is not None:
        wrong = sorted({m.alpha for m in info.modules.values() if m.kind != "conv3x3"} - {None}, key=float)
        if any(abs(a - alpha) > 1e-2 * max(1.0, abs(alpha)) for a in wrong) or not wrong:  # bf16-stored alpha
            problems.append(f"alpha is {wrong or 'not recorded'} but the run's network alpha is {alpha:g}")
    recorded_dim = info.metadata.get("ss_network_dim")
    if recorded_dim not in (None, "Dynamic") and linear_ranks and recorded_dim != str(linear_ranks[-1]):
        problems.append(f"metadata ss_network_dim={recorded_dim} but the tensors' largest rank is {linear_ranks[-1]}")
    if family is not None and info.family is not None and info.family != family:
        problems.append(f"the file is an {info.family} LoRA but the run's family is {family}")
    return problems
