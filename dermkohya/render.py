"""Run file → the files kohya and a person read: config.toml, dataset.toml, sample_prompts.txt,
train_command.sh, manifest.json.

The templates in dermkohya/templates/ are the readable truth of what kohya receives. Values are serialised by a
TOML writer (never quoted by hand), so a caption or path with quotes, spaces or unicode cannot break or
inject anything. Rendering is deterministic and needs neither the base model nor a GPU. Paths in the
rendered files are relative to the project root, which is where kohya runs.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import tomli_w

from dermkohya import __version__, basemodel, dataset, kohya, project
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.files import write_atomic
from dermkohya.manifests import RunManifest
from dermkohya.templating import file_environment, text_template
from dermkohya.skin import FST_TYPES
from dermkohya.spec import SMOKE_BASES, DatasetSection, RunSpec, load_run

SMOKE_MODELS_DIR = basemodel.MODELS_DIR
SMOKE_SEED = basemodel.SMOKE_SEED


@dataclass(frozen=True)
class Subset:
    image_dir: str
    repeats: int
    concept: str
    metadata_file: str | None = None  # a kohya fine-tuning subset: captions from this JSON (ti.py's phase captions)


@dataclass
class RenderedRun:
    """What render wrote, and what train needs to launch it."""

    name: str
    spec: RunSpec
    run_file: Path
    project_root: Path
    out_dir: Path
    output_dir: Path
    files: dict[str, Path]
    launch_args: list[str]
    script_args: list[str]
    manifest: dict[str, Any]  # a manifests.RunManifest's data (what runs/<run>/manifest.json holds)
    dataset_dir: Path
    base_path: Path
    warnings: list[str] = field(default_factory=list)
    config_keys: frozenset[str] = frozenset()  # every key of config.toml, for the check against kohya's parser

    def argv(self, python: Path, sd_scripts: Path) -> list[str]:
        """The exact argv `dermkohya train` runs (and train_command.sh spells out)."""
        return [str(python), *self.launch_args, str(sd_scripts / self.spec.script), *self.script_args]


def toml_value(value: Any) -> str:
    """A value as TOML writes it (the `toml` filter of every template)."""
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


def _environment() -> jinja2.Environment:
    return file_environment(toml=toml_value)


def project_path(path: Path, root: Path) -> str:
    """A path as written in rendered files: relative to the project root when inside it."""
    absolute = Path(os.path.abspath(path if path.is_absolute() else root / path))
    try:
        return absolute.relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return absolute.as_posix()


def dataset_config(dataset: DatasetSection, *, what: str, source: str, resolution: int | tuple[int, int],
                   batch_size: int, validation_split: float, subsets: list[Subset]) -> str:
    """kohya's --dataset_config from dataset.toml.j2: the one renderer (a run's dataset.toml, prepare's
    kohya_dataset.toml), so bucket bounds and keys follow one rule: half the resolution to twice it
    unless the [dataset] section sets them."""
    size = (resolution, resolution) if isinstance(resolution, int) else resolution
    return _environment().get_template("dataset.toml.j2").render(
        what=what, source=source, version=__version__, dataset=dataset, batch_size=batch_size,
        validation_split=validation_split, subsets=subsets,
        resolution=size[0] if size[0] == size[1] else list(size),
        min_bucket_reso=dataset.min_bucket_reso or max(64, min(size) // 2),
        max_bucket_reso=dataset.max_bucket_reso or max(size) * 2,
    )


def smoke_model_paths(family: str, project_root: Path) -> tuple[Path, Path]:
    """Where `random:<family>` lives and the tokenizer cache every run gets: the project's git-ignored
    models/ (built by train, and by generate for a plan's `random:*` base)."""
    return basemodel.project_smoke_model(family, project_root), basemodel.tokenizer_cache_dir(project_root)


def _subsets(spec: RunSpec, root: Path) -> tuple[Path, list[Subset], dict[str, Any]]:
    """The kohya subsets and what is known about the data (counts, template) from a folder or a prepared set."""
    info: dict[str, Any] = {}
    if spec.dataset.prepared is not None:
        from dermkohya import prepare  # the prepared dataset's record says where its kohya folders are

        recipe_dir = root / spec.dataset.prepared
        record = prepare.load_prepared(recipe_dir)
        data_dir = recipe_dir / record.train_data_dir
        info = {"content_hash": record.content_hash, "caption_template": record.caption_template,
                "counts_before": record.counts_before, "counts_after": record.counts_after}
    else:
        data_dir = root / spec.dataset.train_data_dir  # type: ignore[operator]
    if not data_dir.is_dir():
        where = spec.dataset.prepared or spec.dataset.train_data_dir
        raise DermkohyaError(
            f"dataset folder {data_dir} not found (run file [dataset] = {where!r}): "
            "create it (e.g. `dermkohya demo-data` or `dermkohya prepare`) or fix the path"
        )
    subsets = [
        Subset(image_dir=project_path(s.path, root), repeats=s.repeats, concept=s.concept) for s in dataset.find_subsets(data_dir)
    ]
    return data_dir, subsets, info


def _sample_prompts(spec: RunSpec, counts: dict[str, Any]) -> list[dict[str, Any]]:
    """Explicit prompts, else a diagnosis × skin-type grid from the caption template."""
    sample = spec.sample
    if sample.prompts:
        texts = list(sample.prompts)
    else:
        diagnoses = sample.diagnoses or sorted(counts)
        if not diagnoses:
            return []
        template = text_template(sample.template)
        try:
            texts = [template.render(diagnosis=d, fst=f) for d in diagnoses for f in sample.skin_types]
        except jinja2.UndefinedError as exc:
            raise DermkohyaError(f"[sample] template: {exc}; use only {{{{ diagnosis }}}} and {{{{ fst }}}}") from None
    bad = [t for t in texts if " --" in f" {t}" or "\n" in t]
    if bad:
        raise DermkohyaError(f"[sample] prompt {bad[0]!r} contains `--` or a newline, which kohya reads as an option: remove it")
    return [{"text": t, "seed": sample.seed + i} for i, t in enumerate(texts)]


def _launch_args(spec: RunSpec) -> list[str]:
    """accelerate's arguments: explicit, so no accelerate config file on the machine changes the run."""
    launch = spec.launch
    args = ["-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", str(launch.cpu_threads_per_process)]
    args += ["--num_processes", str(launch.processes * launch.machines), "--num_machines", str(launch.machines)]
    if launch.processes * launch.machines > 1:
        args.append("--multi_gpu")
    if launch.machines > 1:
        args += ["--machine_rank", str(launch.machine_rank)]
        args += ["--main_process_ip", str(launch.main_process_ip), "--main_process_port", str(launch.main_process_port)]
    if launch.gpu_ids:
        args += ["--gpu_ids", launch.gpu_ids]
    args += ["--mixed_precision", spec.train.mixed_precision, "--dynamo_backend", "no"]
    return args + list(launch.extra_args)


def render(
    run_file: Path,
    *,
    project_root: Path | None = None,
    out_dir: Path | None = None,
    check_keys: bool = True,
    phase2: dict[str, Any] | None = None,
) -> RenderedRun:
    """Validate the run file and write runs/<run>/; returns what train needs to launch it.

    `phase2` (ti.py, the LoRA phase of ti_then_lora): `base_path` and `tokenizer_cache_dir` of the derived
    base and the `dataset.toml` text whose captions carry the learned tokens replace the run file's own.
    """
    root = (project_root or Path.cwd()).resolve()
    run_file = run_file if run_file.is_absolute() else root / run_file
    spec, name = load_run(run_file)
    out_dir = out_dir or run_file.with_suffix("")
    warnings: list[str] = []

    data_dir, subsets, info = _subsets(spec, root)
    if spec.train.cache_latents_to_disk and spec.dataset.prepared is None:
        raise DermkohyaError(
            f"{run_file}: [train] cache_latents_to_disk writes .npz files into {data_dir}, your source images: "
            "use a prepared dataset ([dataset] prepared = ...) or set cache_latents_to_disk = false"
        )
    counts = info.get("counts_before") or dataset.metadata_counts(data_dir)  # images, not images × repeats
    base_path, tokenizer_dir = _base(spec, root, run_file, warnings)
    if phase2 is not None:
        base_path, tokenizer_dir = phase2["base_path"], phase2["tokenizer_cache_dir"]

    output_dir = root / "output" / name
    prompts = _sample_prompts(spec, counts)
    out_rel = project_path(out_dir, root)
    context = _context(spec, name, root, run_file, base_path, tokenizer_dir, output_dir, out_rel, prompts, subsets)
    env = _environment()
    texts = {
        "config.toml": env.get_template("config.toml.j2").render(context),
        "dataset.toml": phase2["dataset.toml"] if phase2 else dataset_config(
            spec.dataset, what=f"run `{name}`", source=project_path(run_file, root), resolution=spec.resolution,
            batch_size=spec.train.batch_size, validation_split=spec.validation.split, subsets=subsets),
    }
    if prompts:
        texts["sample_prompts.txt"] = env.get_template("sample_prompts.txt.j2").render(context)
    config_keys = _config_keys(spec, texts["config.toml"], run_file, root, check_keys, warnings)

    script_args = ["--config_file", f"{out_rel}/config.toml", "--dataset_config", f"{out_rel}/dataset.toml"]
    launch_args = _launch_args(spec)
    texts["train_command.sh"] = _train_command(env, context, spec, root, out_rel, launch_args, script_args)
    record = RunManifest.model_validate(_manifest(spec, name, root, run_file, base_path, data_dir, info, counts, prompts,
                                                  texts, launch_args, script_args))
    texts["manifest.json"] = record.to_json()
    return RenderedRun(
        name=name,
        spec=spec,
        run_file=run_file,
        project_root=root,
        out_dir=out_dir,
        output_dir=output_dir,
        files=_write_rendered(out_dir, texts),
        launch_args=launch_args,
        script_args=script_args,
        manifest=record.model_dump(mode="json"),
        dataset_dir=data_dir,
        base_path=base_path,
        warnings=warnings,
        config_keys=frozenset(config_keys),
    )


def _base(spec: RunSpec, root: Path, run_file: Path, warnings: list[str]) -> tuple[Path, Path]:
    """The base's path and the tokenizer cache kohya gets. One resolver for every stage; a base that is
    already there is checked against [model] family here (a header read), so a mismatch stops before any
    expensive check or launch. The tokenizer cache is always rendered: offline, kohya asks the hub for the
    CLIP tokenizer of every base but this cache."""
    base = basemodel.resolve_base(spec.model.base, root, must_exist=False)
    if base.found:
        basemodel.check_family(base, spec.model.family, run_file)
    if base.smoke:
        warnings.append(f"base `{spec.model.base}` is a RANDOM-WEIGHT smoke model: the LoRA proves the pipeline, not the data")
    elif base.warning:
        warnings.append(base.warning)
    return base.path, basemodel.tokenizer_cache_dir(root)


def _context(spec: RunSpec, name: str, root: Path, run_file: Path, base_path: Path, tokenizer_dir: Path,
             output_dir: Path, out_rel: str, prompts: list[dict[str, Any]], subsets: list[Subset]) -> dict[str, Any]:
    """What the templates read: every path relative to the project root, where kohya runs."""
    resolution = spec.resolution
    return {
        "spec": spec,
        "run_name": name,
        "run_file": project_path(run_file, root),
        "version": __version__,
        "base_path": project_path(base_path, root),
        "tokenizer_cache_dir": project_path(tokenizer_dir, root),
        "vae": project_path(root / spec.model.vae, root) if spec.model.vae else None,
        "resolution": resolution,
        "resolution_arg": f"{resolution},{resolution}",
        "min_bucket_reso": spec.dataset.min_bucket_reso or max(64, resolution // 2),
        "max_bucket_reso": spec.dataset.max_bucket_reso or resolution * 2,
        "output_dir": project_path(output_dir, root),
        "logging_dir": project_path(output_dir / "logs", root),
        "sample_prompts_path": f"{out_rel}/sample_prompts.txt" if prompts else None,
        "subsets": subsets,
        "prompts": prompts,
        "negative": spec.sample.negative,
        "width": spec.sample.width or resolution,
        "height": spec.sample.height or resolution,
        "steps": spec.sample.steps,
        "guidance": spec.sample.guidance,
        "passthrough": sorted(spec.kohya.items()),
    }


def _config_keys(spec: RunSpec, config_text: str, run_file: Path, root: Path, check_keys: bool,
                 warnings: list[str]) -> set[str]:
    """The rendered config's keys: none may clash with a key dermkohya renders itself, and (check_keys)
    each must be an option of sd-scripts' own parser, which silently ignores unknown ones."""
    config = tomllib.loads(config_text)
    config_keys = _flatten_keys(config)
    own_keys = _flatten_keys({k: v for k, v in config.items() if k != "kohya"}) | {"config_file", "dataset_config"}
    clashes = sorted(set(spec.kohya) & own_keys)
    if clashes:
        raise DermkohyaError(
            f"{run_file}: [kohya] sets {', '.join(clashes)}, which dermkohya renders itself: "
            "set it in the run file's own section instead"
        )
    if check_keys:
        warnings += check_keys_against_kohya(spec.script, config_keys, run_file, project_root=root)
    return config_keys


def _train_command(env: jinja2.Environment, context: dict[str, Any], spec: RunSpec, root: Path, out_rel: str,
                   launch_args: list[str], script_args: list[str]) -> str:
    """train_command.sh: the exact argv, shell-quoted, runnable by hand from anywhere."""
    depth = len(Path(out_rel).parts)
    default_sd_scripts, default_python = project.kohya_paths(root)
    if spec.network.module.startswith("dermkohya."):
        project.ensure_kohya_import_dir(root)  # what train_command.sh puts on kohya's PYTHONPATH
    import_dir = project_path(project.kohya_import_dir(root), root)
    return env.get_template("train_command.sh.j2").render(
        context,
        up="/".join([".."] * depth) if depth else ".",
        default_python=project_path(default_python, root),
        default_sd_scripts=project_path(default_sd_scripts, root),
        kohya_import_dir="$PWD" if import_dir == "." else f"$PWD/{import_dir}",
        launch_args=shlex.join(launch_args),
        script=spec.script,
        script_args=shlex.join(script_args),
    )


def _write_rendered(out_dir: Path, texts: dict[str, str]) -> dict[str, Path]:
    """Write what changed (atomically); a sample_prompts.txt of ours goes when a run has no prompts now."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    stale = out_dir / "sample_prompts.txt"
    if "sample_prompts.txt" not in texts and stale.exists():
        stale.unlink()  # a rendered file of ours, not user data: no prompts now means none for kohya
    for filename, text in texts.items():
        path = out_dir / filename
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            write_atomic(path, text)
        files[filename] = path
    files["train_command.sh"].chmod(0o755)
    return files


def _flatten_keys(config: dict[str, Any]) -> set[str]:
    return {key for section in config.values() if isinstance(section, dict) for key in section} | {
        key for key, value in config.items() if not isinstance(value, dict)
    }


def check_keys_against_kohya(script: str, keys: set[str] | frozenset[str], run_file: Path,
                             known: set[str] | None = None, *, project_root: Path | None = None) -> list[str]:
    """kohya's --config_file accepts unknown keys silently; we refuse them, using kohya's own parser.

    Returns warnings (the check could not run); raises ProblemsError naming each unknown key.
    """
    if known is None:
        try:
            known = kohya.argument_names(script, project_root)
        except DermkohyaError as exc:
            return [f"rendered keys not checked against sd-scripts: {str(exc).splitlines()[0]}"]
    unknown = sorted(keys - known)
    if unknown:
        import difflib

        problems = []
        for key in unknown:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" — did you mean `{near[0]}`?" if near else ""
            problems.append(f"`{key}` is not an option of sd-scripts' {script}{hint} (fix it in [kohya] or the section that sets it)")
        raise ProblemsError(str(run_file), problems)
    return []


def _sizes(data_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Images and effective samples per epoch (images × repeats) apart: a card must not call one the other."""
    subsets = [s for s in dataset.find_subsets(data_dir) if not s.is_reg]
    return {
        "images": sum(len(s.images) for s in subsets),
        "effective_samples": sum(len(s.images) * s.repeats for s in subsets),
        "effective_counts": info.get("counts_after"),
    }


def _manifest(
    spec: RunSpec,
    name: str,
    root: Path,
    run_file: Path,
    base_path: Path,
    data_dir: Path,
    info: dict[str, Any],
    counts: dict[str, Any],
    prompts: list[dict[str, Any]],
    texts: dict[str, str],
    launch_args: list[str],
    script_args: list[str],
) -> dict[str, Any]:
    """Everything the run used, so nothing about it is hidden state. Deterministic: no clocks, no hashes of big files.
    The data of a `manifests.RunManifest` (validated when rendered into manifest.json)."""
    try:
        sd_scripts = kohya.find_sd_scripts(root)
        sd_path: str | None = project_path(sd_scripts, root)
        commit = kohya.sd_scripts_commit(sd_scripts)
    except DermkohyaError:
        sd_path, commit = None, None
    return {
        "run_name": name,
        "run_file": project_path(run_file, root),
        "run_file_sha256": hashlib.sha256(run_file.read_bytes()).hexdigest(),
        "dermkohya_version": __version__,
        "family": spec.model.family,
        "script": spec.script,
        "spec": spec.model_dump(mode="json"),
        "network": {"module": spec.network.module, "dim": spec.network.dim, "alpha": spec.network.alpha},
        "train": spec.train.model_dump(mode="json") | {"resolution": spec.resolution},
        "sd_scripts": {"path": sd_path, "commit": commit, "pinned_commit": kohya.PINNED_COMMIT},
        "base_model": {
            "spec": spec.model.base,
            "path": project_path(base_path, root),
            "expected_sha256": spec.model.sha256,
            "sha256": None,
            "verified": False,
            "smoke": spec.model.base in SMOKE_BASES,
        },
        "dataset": {
            "train_data_dir": project_path(data_dir, root),
            "prepared": spec.dataset.prepared,
            "content_hash": info.get("content_hash") or dataset.content_hash(data_dir),
            "counts": counts,
            **_sizes(data_dir, info),
            "caption_template": info.get("caption_template"),
            "skin_types": list(FST_TYPES),
        },
        "sample_prompts": [p["text"] for p in prompts],
        "rendered_sha256": {k: hashlib.sha256(v.encode()).hexdigest() for k, v in sorted(texts.items())},
        "launch_args": launch_args,
        "script_args": script_args,
    }
