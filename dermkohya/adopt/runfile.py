"""A Source (kohya's options) → the run file: dermkohya's keys where they exist, `[kohya]` for the rest.

Every key written carries a comment when it was converted, is kohya's default written out, or needs the
user. Where the rendered run will hand kohya a different value than the source did (dermkohya's own
choices: captions from .txt, outputs under output/<run>/, seeded runs …), the difference is recorded
with its reason, so `adopt` lists it and the round-trip test can hold it to exactly that list.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PureWindowsPath
from typing import Any

from dermkohya.adopt.source import Note, Source
from dermkohya.paths import TEMPLATES_DIR
from dermkohya.render import toml_value
from dermkohya.spec import DEFAULT_RESOLUTION

TODO = "TODO"
PACKAGES = {"lycoris": "lycoris-lora"}  # network modules outside sd-scripts → the package that provides them
SECTIONS = ("model", "dataset", "network", "train", "sample", "validation", "launch", "kohya")
# kohya's defaults for the options dermkohya renders, so that an option the source leaves out is written
# out as what kohya would have used (values from sd-scripts' own parser at the pinned commit).
KOHYA_DEFAULTS: dict[str, Any] = {
    "network_alpha": 1, "learning_rate": 2e-6, "train_batch_size": 1, "max_train_steps": 1600, "mixed_precision": "no",
    "gradient_accumulation_steps": 1, "max_data_loader_n_workers": 8, "lr_scheduler": "constant", "lr_warmup_steps": 0,
    "optimizer_type": "", "bucket_reso_steps": 64, "min_bucket_reso": 256, "max_bucket_reso": 1024,
    "caption_extension": ".caption", "sample_sampler": "ddim", "keep_tokens": 0, "save_model_as": "safetensors",
    "console_log_level": None,
}
# Paths differ by design (the project's layout): never compared, always the project's.
PATH_KEYS = frozenset({"pretrained_model_name_or_path", "vae", "train_data_dir", "output_dir", "logging_dir",
                       "tokenizer_cache_dir", "sample_prompts", "config_file", "dataset_config"})
# Dataset options dermkohya renders into dataset.toml's [general] (not kohya's arguments).
# Dataset-config options kohya also takes as arguments, where they are the default of every subset.
DATASET_AS_ARGS = frozenset({"color_aug", "random_crop", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                             "caption_tag_dropout_rate", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
                             "caption_prefix", "caption_suffix", "face_crop_aug_range", "caption_separator", "token_warmup_min",
                             "token_warmup_step", "resize_interpolation", "alpha_mask", "cache_info"})
# Dataset-config options the run file holds ([dataset], [train], [validation]) or that say where the images are.
DATASET_MAPPED = frozenset({"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                            "bucket_no_upscale", "caption_extension", "shuffle_caption", "keep_tokens", "flip_aug",
                            "validation_split", "validation_seed"})
DATASET_KEYS = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "shuffle_caption",
                "keep_tokens", "flip_aug")


@functools.cache
def rendered_keys() -> frozenset[str]:
    """Every key config.toml.j2 renders: a source may not pass these through [kohya] (render refuses a clash)."""
    text = (TEMPLATES_DIR / "config.toml.j2").read_text(encoding="utf-8")
    return frozenset(re.findall(r'kv\("(\w+)"', text)) | frozenset(re.findall(r"^(\w+) = ", text, re.M))


@dataclass
class Entry:
    key: str
    value: Any
    comment: str = ""


@dataclass
class Adopted:
    """The run file's text and adopt's account of it."""

    text: str
    notes: list[Note]
    differences: dict[str, str]  # kohya option → why the rendered run passes a different value than the source
    todo: list[str] = field(default_factory=list)  # `[section] key`s left as TODO


class _Builder:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.args = dict(source.args)  # what is left goes to [kohya]
        self.sections: dict[str, list[Entry]] = {s: [] for s in SECTIONS}
        self.notes: list[Note] = list(source.notes)
        self.differences: dict[str, str] = {}
        self.todo: list[str] = []
        general = dict((source.dataset or {}).get("general", {}))
        datasets = (source.dataset or {}).get("datasets", [])
        self.dataset = {**general, **{k: v for k, v in (datasets[0] if datasets else {}).items() if k != "subsets"}}

    def original(self, key: str) -> Any:
        """What kohya's parser held for `key` in the source (its default where the source is silent)."""
        return self.source.args.get(key, KOHYA_DEFAULTS.get(key))

    def take(self, key: str, default: Any = None, *, dataset: bool = False) -> tuple[Any, str]:
        """The source's value and where it came from; a dataset option prefers the dataset config, as kohya does."""
        self.args.pop(key, None)
        if dataset and key in self.dataset:
            return self.dataset[key], f"from the dataset config's {key}"
        if key in self.source.args and self.source.args[key] is not None:
            return self.source.args[key], ""
        if key in KOHYA_DEFAULTS and KOHYA_DEFAULTS[key] is not None:
            return KOHYA_DEFAULTS[key], "kohya's default (not in the source)"
        return default, ""

    def put(self, section: str, key: str, value: Any, comment: str = "", *, renders: dict[str, Any] | None = None,
            why: str = "") -> None:
        if value is None:
            return
        self.sections[section].append(Entry(key, value, comment))
        for arg, rendered in (renders or {}).items():
            self.differs(arg, rendered, why or comment or "dermkohya's value")

    def differs(self, arg: str, rendered: Any, why: str) -> None:
        if arg not in PATH_KEYS and not _same(self.original(arg), rendered):
            self.differences[arg] = why
            now = "leaves it out" if rendered is None else f"renders {rendered!r}"
            self.notes.append(Note(arg, "dermkohya", f"{why} (the source gave kohya {self.original(arg)!r}, the run {now})"))

    def needs(self, key: str, text: str) -> None:
        self.notes.append(Note(key, "needs you", text))


def _same(a: Any, b: Any) -> bool:
    return a == b or (a in (None, False) and b in (None, False))


def build(source: Source, *, name: str, base: str | None, train_data_dir: str | None, root: Path) -> Adopted:
    """The run file for `source`; `base` and `train_data_dir` (the options) win over the source's paths."""
    b = _Builder(source)
    _model(b, base)
    _dataset(b, train_data_dir, root)
    _network(b)
    _train(b)
    _sample(b, root)
    _validation(b)
    _launch(b)
    _dermkohya_own(b, name)
    for key in sorted(b.args):
        value = b.args[key]
        if value is None:
            continue
        if key in rendered_keys():
            b.notes.append(Note(key, "dropped", "dermkohya renders this option itself"))
            continue
        b.put("kohya", key, value)
    return Adopted(text=write(b, name), notes=b.notes, differences=b.differences, todo=b.todo)


def _path(b: _Builder, section: str, key: str, option: str | None, source_key: str, flag: str, what: str,
          fallback: str | None = None) -> None:
    value, _ = b.take(source_key)
    origin = source_key if value else "the dataset config's image_dir folders"
    value = value or fallback
    if option:
        b.put(section, key, option, f"from {flag}" + (f" (the source had {value!r})" if value and value != option else ""))
    elif value:
        b.put(section, key, str(value), f"from {origin}: check it is right on this machine")
    else:
        b.put(section, key, f"{TODO}: {what}", f"needs you: the source names none; set it or pass {flag}")
        b.todo.append(f"[{section}] {key}")
        b.needs(f"[{section}] {key}", f"{what}: set it in the run file or pass {flag} (render refuses the TODO)")


def _model(b: _Builder, base: str | None) -> None:
    _path(b, "model", "base", base, "pretrained_model_name_or_path", "--base", "the base model (.safetensors file or diffusers folder)")
    b.put("model", "family", b.source.family, f"{'sdxl_train_network.py' if b.source.family == 'sdxl' else 'train_network.py'}")
    vae, _ = b.take("vae")
    b.put("model", "vae", vae, "from vae: check the path on this machine" if vae else "")
    half, _ = b.take("no_half_vae")
    b.put("model", "no_half_vae", True if half else None)


def _dataset(b: _Builder, option: str | None, root: Path) -> None:
    _dataset_config(b)
    subsets = [s for d in (b.source.dataset or {}).get("datasets", []) for s in d.get("subsets", [])]
    parents = {str(_pure(s["image_dir"]).parent) for s in subsets if "image_dir" in s and not s.get("is_reg")}
    from_config = parents.pop() if len(parents) == 1 else None
    if subsets:
        b.needs("[dataset] train_data_dir", "dermkohya reads each subset's repeats and class token from its folder name "
                "(`<repeats>_<token>`): " + "; ".join(f"{s.get('image_dir')}: num_repeats={s.get('num_repeats', 1)}, "
                                                       f"class_tokens={s.get('class_tokens')!r}" for s in subsets))
    _path(b, "dataset", "train_data_dir", option, "train_data_dir", "--train-data-dir", "the parent of your N_concept image folders",
          fallback=from_config)
    b.take("reg_data_dir")
    if b.source.args.get("reg_data_dir"):
        b.needs("reg_data_dir", "dermkohya trains without regularisation images: dropped")

    ext, origin = b.take("caption_extension", dataset=True)
    if ext != ".txt":
        folder = root / (option or str(b.source.args.get("train_data_dir") or from_config or ""))
        matches = len(list(folder.rglob(f"*{ext}"))) if ext and folder.is_dir() else 0
        b.needs("caption_extension", f"the source read captions from {ext!r} files ({matches} found); dermkohya always reads .txt "
                "(kohya's default .caption silently trains on folder names when nothing matches): name your caption files *.txt")
    b.put("dataset", "caption_extension", ".txt", "dermkohya always reads .txt captions" if ext != ".txt" else "",
          renders={}, why="")
    for key in DATASET_KEYS:
        value, origin = b.take(key, False if key in ("enable_bucket", "shuffle_caption", "flip_aug") else None, dataset=True)
        if key == "bucket_reso_steps" and value % 8:
            b.needs(key, f"{value} is not a multiple of 8 (latents are 1/8 of the image; dermkohya's minimum is 8): 64 written")
            value, origin = 64, f"needs you: the source's {value} is not a multiple of 8"
        b.put("dataset", key, value, origin)
    for key in ("caption_extension", "train_data_dir", *DATASET_KEYS, "bucket_no_upscale"):
        if key in b.source.args and key not in PATH_KEYS:
            b.differs(key, None, "rendered into dataset.toml ([dataset]) instead of the arguments, where kohya reads it first")
    upscale, _ = b.take("bucket_no_upscale", dataset=True)
    if not upscale and b.dataset.get("enable_bucket", b.source.args.get("enable_bucket")):
        b.notes.append(Note("bucket_no_upscale", "dermkohya", "always true with bucketing: small images are not upscaled"))


def _dataset_config(b: _Builder) -> None:
    """Account for every key of the --dataset_config: adopted, moved into the arguments, or left to the user."""
    config = b.source.dataset or {}
    datasets = config.get("datasets", [])
    if len(datasets) > 1:
        b.needs("[[datasets]]", f"{len(datasets)} datasets in {b.source.dataset_path}: only the first one's settings were adopted")
    levels = [("[general]", config.get("general", {}))] + [("[[datasets]]", {k: v for k, v in d.items() if k != "subsets"}) for d in datasets[:1]]
    subsets = [s for d in datasets[:1] for s in d.get("subsets", [])]
    for where, table in levels:
        for key, value in table.items():
            if key in DATASET_AS_ARGS:
                b.args.setdefault(key, value)
                b.notes.append(Note(key, "converted", f"{where} → [kohya] (kohya's default for every subset)"))
                b.differs(key, value, "moved from the dataset config into the arguments, where kohya takes it as every subset's default")
            elif key not in DATASET_MAPPED:
                b.needs(key, f"{where} {key} = {value!r} has no place in a run file: dermkohya renders the dataset config itself")
    for i, subset in enumerate(subsets, 1):
        for key, value in subset.items():
            if key in ("image_dir", "num_repeats", "class_tokens"):
                continue
            if key in DATASET_MAPPED | DATASET_AS_ARGS and all(s.get(key) == value for s in subsets):
                if key in DATASET_AS_ARGS:
                    b.args.setdefault(key, value)
                    b.differs(key, value, "moved from the dataset config's subsets into the arguments")
                elif key not in b.dataset:
                    b.dataset[key] = value
                if i == 1:
                    b.notes.append(Note(key, "converted", "the same in every subset → one value"))
            else:
                b.needs(f"subset {i} {key}", f"{value!r}: a per-subset setting dermkohya does not render (is_reg, metadata_file, "
                        "or a value that differs between subsets): dropped")


def _installed(package: str) -> bool | str:
    """True when kohya's Python can import `package`, else why not (a quick find_spec: nothing is imported)."""
    import subprocess

    from dermkohya import kohya
    from dermkohya.errors import DermkohyaError

    try:
        python = kohya.find_python()
    except DermkohyaError:
        return "kohya's environment was not found to check it"
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({package!r}) is None)"
    found = subprocess.run([str(python), "-c", code], capture_output=True).returncode == 0
    return True if found else f"is not installed in kohya's environment ({python})"


def _pure(path: str) -> PurePath:
    """A dataset config's path as its author wrote it (a Windows path stays one on Linux)."""
    return PureWindowsPath(path) if "\\" in path else PurePath(path)


def _network(b: _Builder) -> None:
    module, _ = b.take("network_module")
    b.put("network", "module", module or "networks.lora", "" if module else "needs you: the source names no network_module")
    if module and not module.startswith(("networks.", "dermkohya.")):
        state = _installed(module.split(".")[0])
        if state is not True:
            b.needs("network_module", f"{module!r} is not part of sd-scripts and {state}: install "
                    f"`{PACKAGES.get(module.split('.')[0], module.split('.')[0])}` into kohya's environment before training")
    dim, _ = b.take("network_dim")
    b.put("network", "dim", dim if dim is not None else 4, "" if dim is not None else "networks.lora's default (the source sets none)",
          renders={"network_dim": dim if dim is not None else 4}, why="kohya's None means the network's own default, 4")
    alpha, origin = b.take("network_alpha")
    b.put("network", "alpha", alpha, origin)
    for key, name in (("network_dropout", "dropout"), ("network_args", "args")):
        value, _ = b.take(key)
        b.put("network", name, value or None)
    unet_only, _ = b.take("network_train_unet_only")
    b.put("network", "train_unet_only", bool(unet_only))


def _train(b: _Builder) -> None:
    put = b.put
    for key, name in (("learning_rate", "learning_rate"), ("unet_lr", "unet_lr")):
        value, origin = b.take(key)
        put("train", name, value, origin)
    te, _ = b.take("text_encoder_lr")
    if isinstance(te, list) and te:
        if len(set(te)) > 1:
            b.needs("text_encoder_lr", f"{te}: one rate per text encoder; dermkohya has one `text_encoder_lr`: {te[0]} written")
        b.differs("text_encoder_lr", te[0], "a list in the source, one number in the run file (kohya reads either)")
        te = te[0]
    put("train", "text_encoder_lr", te)
    size, origin = b.take("train_batch_size")
    if "batch_size" in b.dataset:
        size, origin = b.dataset["batch_size"], "from the dataset config's batch_size"
    put("train", "batch_size", size, origin, renders={"train_batch_size": size}, why="from the dataset config")
    epochs, _ = b.take("max_train_epochs")
    steps, origin = b.take("max_train_steps")
    put("train", "epochs", epochs)
    put("train", "max_steps", steps if epochs is None or "max_train_steps" in b.source.args else None,
        origin if epochs is None else "")
    _resolution(b)
    for key, name in (("mixed_precision", "mixed_precision"), ("save_precision", "save_precision")):
        value, origin = b.take(key)
        put("train", name, value, origin)
    if "save_precision" not in b.source.args:
        put("train", "save_precision", "float", "kohya's None saves the trained dtype (float for LoRA weights)",
            renders={"save_precision": "float"}, why="kohya's None keeps the weights' dtype, float")
    optimizer, origin = b.take("optimizer_type")
    put("train", "optimizer", optimizer or "AdamW", origin if optimizer else "kohya's default, AdamW",
        renders={"optimizer_type": optimizer or "AdamW"}, why="kohya's \"\" means AdamW")
    for key, name in (("optimizer_args", "optimizer_args"), ("lr_scheduler", "lr_scheduler"), ("lr_warmup_steps", "lr_warmup_steps"),
                      ("min_snr_gamma", "min_snr_gamma"), ("noise_offset", "noise_offset"), ("clip_skip", "clip_skip"),
                      ("gradient_accumulation_steps", "gradient_accumulation_steps"),
                      ("max_data_loader_n_workers", "data_loader_workers")):
        value, origin = b.take(key)
        put("train", name, (value or None) if key == "optimizer_args" else value, origin)
    for key in ("gradient_checkpointing", "cache_latents", "persistent_data_loader_workers", "save_state"):
        value, _ = b.take(key)
        put("train", key, bool(value))
    to_disk, _ = b.take("cache_latents_to_disk")
    put("train", "cache_latents_to_disk", False, "needs you: true writes .npz files into your image folders" if to_disk else "",
        renders={"cache_latents_to_disk": False}, why="it writes .npz files into the source images: use a prepared dataset to turn it on")
    seed, _ = b.take("seed")
    put("train", "seed", seed if seed is not None else 42, "" if seed is not None else "the source sets none (random); dermkohya seeds every run",
        renders={"seed": seed if seed is not None else 42}, why="every dermkohya run is seeded")
    every, _ = b.take("save_every_n_epochs")
    if every is None:
        b.differs("save_every_n_epochs", 1, "a run file saves every epoch at least (its default 1); kohya saved only at the end")
    put("train", "save_every_n_epochs", every)
    flags = {k: bool(b.take(k)[0]) for k in ("mem_eff_attn", "xformers", "sdpa")}
    attention = next((k for k, on in flags.items() if on), "none")  # kohya's own precedence
    put("train", "attention", attention, "" if sum(flags.values()) < 2 else "kohya uses the first of mem_eff_attn, xformers, sdpa",
        renders={k: k == attention for k in flags}, why="kohya uses only the first of mem_eff_attn, xformers, sdpa")


def _resolution(b: _Builder) -> None:
    value, origin = b.take("resolution", dataset=True)
    if value is None:
        size = DEFAULT_RESOLUTION[b.source.family]
        b.put("train", "resolution", size, "the source sets none: the family's size", renders={"resolution": f"{size},{size}"},
              why="the source set no resolution")
        return
    sizes = [int(v) for v in (value if isinstance(value, list) else str(value).split(","))] if not isinstance(value, int) else [value]
    width, height = sizes[0], sizes[-1]
    if width != height:
        b.needs("resolution", f"{width}×{height} is not square: dermkohya trains at one size; {max(width, height)} written "
                "(with bucketing, kohya keeps each image's aspect)")
    size = max(width, height)
    b.put("train", "resolution", size, origin or (f"from {value!r}" if not isinstance(value, int) else ""),
          renders={"resolution": f"{size},{size}"}, why="dermkohya renders `resolution` as W,W")


def _sample(b: _Builder, root: Path) -> None:
    prompts, _ = b.take("sample_prompts")
    if isinstance(prompts, str):
        path = Path(prompts) if Path(prompts).is_absolute() else root / prompts
        prompts = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        if not prompts:
            b.needs("sample_prompts", f"{path} not found: copy its prompts into [sample] prompts")
    texts = [p.split(" --")[0].strip() for p in prompts or [] if p.strip() and not p.lstrip().startswith("#")]
    if any(" --" in p for p in prompts or []):
        b.needs("[sample] prompts", "kohya's per-prompt options (--n, --w, --h, --s, --l, --d) were cut: use [sample] negative, width, "
                "height, steps, guidance and seed")
    b.put("sample", "prompts", texts or None, "from sample_prompts" if texts else "")
    for key, name in (("sample_every_n_epochs", "every_n_epochs"), ("sample_every_n_steps", "every_n_steps"), ("sample_sampler", "sampler")):
        value, _ = b.take(key)
        b.put("sample", name, value if texts and key in b.source.args else None)
        if not texts and key != "sample_sampler" and b.source.args.get(key):
            b.needs(key, f"{value}: the source samples images but gave dermkohya no prompts: set [sample] prompts (or diagnoses) "
                    f"and [sample] {name} = {value}")


def _validation(b: _Builder) -> None:
    split, origin = b.take("validation_split", dataset=True)
    b.put("validation", "split", split or None, origin)
    for key, name in (("validation_seed", "seed"), ("validate_every_n_steps", "every_n_steps"), ("validate_every_n_epochs", "every_n_epochs")):
        value, origin = b.take(key, dataset=key == "validation_seed")
        b.put("validation", name, value, origin)


def _launch(b: _Builder) -> None:
    launch = dict(b.source.launch)
    machines = int(launch.pop("num_machines", 1) or 1)
    processes = int(launch.pop("num_processes", machines) or machines)
    b.put("launch", "processes", max(1, processes // machines) if processes > 1 else None, "accelerate's --num_processes per machine")
    b.put("launch", "machines", machines if machines > 1 else None)
    for key, name in (("machine_rank", "machine_rank"), ("main_process_ip", "main_process_ip"), ("main_process_port", "main_process_port"),
                      ("gpu_ids", "gpu_ids"), ("num_cpu_threads_per_process", "cpu_threads_per_process")):
        value = launch.pop(key, None)
        b.put("launch", name, int(value) if name in ("machine_rank", "main_process_port", "cpu_threads_per_process") and value else
              (str(value) if value else None), f"from accelerate's --{key}" if value else "")
    launch.pop("multi_gpu", None)
    precision = launch.pop("mixed_precision", None)
    if precision and precision != b.source.args.get("mixed_precision", "no"):
        b.notes.append(Note("--mixed_precision", "dermkohya", f"accelerate's {precision!r} and the script's differ: dermkohya passes [train] mixed_precision to both"))
    for key in ("dynamo_backend", "dynamo_mode", "dynamo_use_fullgraph", "dynamo_use_dynamic"):
        if launch.pop(key, None):
            b.notes.append(Note(key, "dropped", "dermkohya launches with --dynamo_backend no (torch.compile of the training step is lora_fast's job)"))
    extra = str(launch.pop("extra", "")).replace('"', "").split()
    for key, value in launch.items():
        extra += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    b.put("launch", "extra_args", extra or None, "accelerate options dermkohya does not model" if extra else "")


def _dermkohya_own(b: _Builder, name: str) -> None:
    """Options dermkohya always renders itself: outputs and logs under output/<run>/, the tokenizer cache, logging mode."""
    for key, why in (("output_dir", "outputs go to output/<run>/"), ("output_name", f"the LoRA is named after the run ({name})"),
                     ("logging_dir", "logs go to output/<run>/logs"), ("save_model_as", "dermkohya saves .safetensors only"),
                     ("console_log_simple", "rendered explicitly: kohya's rich console handler consumes Python's RNG"),
                     ("console_log_level", "rendered explicitly (INFO)"), ("tokenizer_cache_dir", "the project's offline tokenizer cache"),
                     ("config_file", "runs/<run>/config.toml"), ("dataset_config", "runs/<run>/dataset.toml, rendered from [dataset]")):
        b.take(key)
        rendered = {"output_name": name, "save_model_as": "safetensors", "console_log_simple": True, "console_log_level": "INFO"}.get(key)
        b.differs(key, rendered, why)


def write(b: _Builder, name: str) -> str:
    """The run file's text: TOML values written by TOML's own writer, a comment beside what was converted."""
    lines = [f"# Adopted by `dermkohya adopt` from {b.source.path} ({b.source.kind}).",
             "# Review the `needs you` lines below, then: dermkohya render runs/" + f"{name}.toml",
             f'description = {toml_value("adopted from " + Path(b.source.path).name)}']
    for section in SECTIONS:
        entries = b.sections[section]
        if not entries:
            continue
        lines += ["", f"[{section}]"] + (["# passed to kohya as written; render checks each key against sd-scripts' own parser"]
                                          if section == "kohya" else [])
        width = min(40, max((len(f"{e.key} = {toml_value(e.value)}") for e in entries if not isinstance(e.value, list)), default=0))
        for e in entries:
            text = f"{e.key} = {toml_value(e.value)}"
            if e.comment and "\n" in text:
                lines += [f"# {e.key}: {e.comment}", text]
            else:
                lines.append(f"{text:<{width}}  # {e.comment}" if e.comment else text)
    for kind, title in (("needs you", "Needs you"), ("dermkohya", "dermkohya's own choices (the rendered run differs from the source here)"),
                        ("dropped", "Dropped from the source"), ("converted", "Converted")):
        notes = [n for n in b.notes if n.kind == kind]
        if notes:
            lines += ["", f"# {title}:"] + [f"#   {n.key}: {n.text}" for n in notes]
    return "\n".join(lines) + "\n"
