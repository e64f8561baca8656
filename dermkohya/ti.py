"""Textual inversion, alone or before a LoRA (`method = "textual_inversion"` / `"ti_then_lora"`).

kohya's train_textual_inversion.py learns one token string per run, so phase 1 is one short kohya run per
token (a diagnosis × skin-type cell, or a diagnosis). train_network.py cannot load embeddings, so phase 2
trains on a *derived base*: a diffusers folder whose unet/vae are hard links to the base and whose text
encoder has the learned rows appended, plus a tokenizer cache that knows the new tokens; kohya reads both
as it reads any base. The phase captions are written as kohya fine-tuning metadata files in the rendered
folder (runs/<run>/ti/, runs/<run>/lora/): the user's caption files are never edited.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from dermkohya import basemodel, dataset, kohya, manifests, render
from dermkohya.dataset.sidecar import read_metadata
from dermkohya.errors import DermkohyaError
from dermkohya.files import write_atomic
from dermkohya.spec import RunSpec, load_run
from dermkohya.names import slug
from dermkohya.templating import text_template
from dermkohya.embeddings import (  # noqa: F401 (re-exported for collect, generate and tests)
    CLIP_L_DIR, DerivedBase, build_derived_base, describe_embedding, embedding_files, load_embeddings, read_embedding,
)

TI_SCRIPTS: dict[str, str] = {"sd15": "train_textual_inversion.py", "sdxl": "sdxl_train_textual_inversion.py"}



@dataclass(frozen=True)
class Token:
    """One learned token: the string kohya trains, the cell it stands for, and its images with captions."""

    string: str
    diagnosis: str
    fst: str | None  # None for token_scope = "diagnosis" (the skin type stays in words)
    images: tuple[tuple[Path, int, str], ...]  # (image, subset repeats, phase caption)

    @property
    def slug(self) -> str:
        return slug(self.string) or "token"

    def strings(self, vectors: int) -> list[str]:
        """What kohya adds to the tokenizer: `tok`, `tok1`, … for `vectors` vectors."""
        return [self.string] + [f"{self.string}{i}" for i in range(1, vectors)]

    def expanded(self, vectors: int) -> str:
        return " ".join(self.strings(vectors))


def _template(text: str, where: str) -> jinja2.Template:
    try:
        return text_template(text)
    except jinja2.TemplateSyntaxError as exc:
        raise DermkohyaError(f"[textual_inversion] {where}: {exc}: fix the template") from None


def plan_tokens(spec: RunSpec, data_dir: Path, run_file: Path) -> list[Token]:
    """The tokens of a run from its dataset's diagnoses × skin types (metadata.csv beside the kohya folders)."""
    ti = spec.textual_inversion
    subsets = [s for s in dataset.find_subsets(data_dir) if not s.is_reg]
    images = [(image, s.repeats) for s in subsets for image in s.images]
    records = read_metadata(data_dir, [i for i, _ in images], [])
    missing = [i for i, _ in images if "diagnosis" not in records.get(i, {})
               or (ti.token_scope == "cell" and "fitzpatrick" not in records.get(i, {}))]
    if missing:
        raise DermkohyaError(
            f"{data_dir}: {len(missing)} image(s) have no diagnosis"
            f"{' or skin type' if ti.token_scope == 'cell' else ''} in metadata.csv (first: {missing[0]}): textual "
            "inversion learns one token per diagnosis (× skin type); add them to metadata.csv (`dermkohya prepare` writes it)")
    token_tpl = _template(ti.template, "token_template")
    caption_tpl = _template(ti.caption_template, "caption_template")
    cells: dict[tuple[str, str | None], list[tuple[Path, int, str]]] = {}
    for image, repeats in images:
        record = records[image]
        key = (record["diagnosis"], record.get("fitzpatrick") if ti.token_scope == "cell" else None)
        cells.setdefault(key, []).append((image, repeats, record.get("fitzpatrick", "")))
    tokens: list[Token] = []
    for (diagnosis, fst), items in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        try:
            string = token_tpl.render(diagnosis=diagnosis, fst=fst or "").strip()
        except jinja2.UndefinedError as exc:
            raise DermkohyaError(f"{run_file}: [textual_inversion] token_template: {exc}; use diagnosis and fst") from None
        if not string or any(ch.isspace() for ch in string) or string.lower() != string:
            raise DermkohyaError(f"{run_file}: [textual_inversion] token_template gives {string!r} for {diagnosis!r}: "
                                 "a token must be one lower-case word without spaces (the CLIP tokenizer lower-cases "
                                 "captions), e.g. <{{ diagnosis | slug }}>")
        captioned = []
        for image, repeats, image_fst in items:
            source = _source_caption(image)
            try:
                text = caption_tpl.render(token=string, caption=source, diagnosis=diagnosis, fst=image_fst)
            except jinja2.UndefinedError as exc:
                raise DermkohyaError(f"{run_file}: [textual_inversion] caption_template: {exc}; use token, caption, "
                                     "diagnosis, fst") from None
            if string not in text:
                raise DermkohyaError(f"{run_file}: [textual_inversion] caption_template gives {text!r} without the token "
                                     f"{string}: put {{{{ token }}}} in it")
            captioned.append((image, repeats, text))
        tokens.append(Token(string, diagnosis, fst, tuple(captioned)))
    strings = [t.string for t in tokens]
    if len(set(strings)) != len(strings):
        dup = next(s for s in strings if strings.count(s) > 1)
        raise DermkohyaError(f"{run_file}: [textual_inversion] token_template gives {dup} for two cells: "
                             "include what tells them apart (fst for token_scope = \"cell\")")
    return tokens


def _source_caption(image: Path) -> str:
    caption = image.with_suffix(".txt")
    return caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""


# ---- rendering ------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One kohya launch of a TI run: where its files are and the argv train runs."""

    label: str
    script: str
    out_dir: Path
    output_dir: Path
    output_name: str
    script_args: list[str]
    config_keys: frozenset[str]
    token: Token | None = None


@dataclass
class TIRun:
    name: str
    spec: RunSpec
    run_file: Path
    root: Path
    out_dir: Path
    tokens: list[Token]
    phases: list[Phase] = field(default_factory=list)
    launch_args: list[str] = field(default_factory=list)
    base_path: Path = Path()
    data_dir: Path = Path()


def _fine_tuning_dataset(spec: RunSpec, entries: list[tuple[Path, int, str]], folder: Path, root: Path,
                         resolution: int, batch_size: int, vectors: int, tokens: list[Token]) -> str:
    """A --dataset_config of kohya fine-tuning subsets (one per image folder and repeat count) whose
    captions come from metadata files written into `folder`, never from the user's caption files."""
    groups: dict[tuple[Path, int], dict[str, dict[str, str]]] = {}
    for image, repeats, caption in entries:
        for token in tokens:  # kohya's train_network.py does not expand multi-vector tokens itself
            if vectors > 1:
                caption = caption.replace(token.string, token.expanded(vectors))
        groups.setdefault((image.parent, repeats), {})[image.name] = {"caption": caption}
    subsets = []
    for n, ((image_dir, repeats), metadata) in enumerate(sorted(groups.items())):
        meta = folder / f"captions-{n}.json"
        text = json.dumps(metadata, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        if not meta.exists() or meta.read_text(encoding="utf-8") != text:
            write_atomic(meta, text)
        subsets.append({"image_dir": render.project_path(image_dir, root), "metadata_file": render.project_path(meta, root),
                        "num_repeats": repeats})
    ds = spec.dataset
    general: dict[str, Any] = {"resolution": resolution, "batch_size": batch_size, "enable_bucket": ds.enable_bucket,
                               "shuffle_caption": ds.shuffle_caption, "keep_tokens": ds.keep_tokens, "flip_aug": ds.flip_aug}
    if ds.enable_bucket:
        general |= {"min_bucket_reso": ds.min_bucket_reso or max(64, resolution // 2),
                    "max_bucket_reso": ds.max_bucket_reso or resolution * 2,
                    "bucket_reso_steps": ds.bucket_reso_steps, "bucket_no_upscale": True}
    import tomli_w

    header = "# kohya --dataset_config rendered by dermkohya (ti.py): fine-tuning subsets, captions in captions-*.json\n"
    return header + tomli_w.dumps({"general": general, "datasets": [{"subsets": subsets}]})


def render_ti(run_file: Path, *, project_root: Path | None = None, check_keys: bool = True) -> TIRun:
    """Write runs/<run>/ti/<token>/ (config.toml, dataset.toml, captions) for every phase-1 run; phase 2's
    files are rendered by `render_lora_phase` once the derived base exists (its path is part of them)."""
    root = (project_root or Path.cwd()).resolve()
    run_file = run_file if run_file.is_absolute() else root / run_file
    spec, name = load_run(run_file)
    if spec.method == "lora":
        raise DermkohyaError(f"{run_file}: method is \"lora\": render it with `dermkohya render`")
    if spec.method == "ti_then_lora" and spec.model.family != "sd15":
        raise DermkohyaError(f"{run_file}: ti_then_lora builds its phase-2 base for SD 1.5 only so far (SDXL has two "
                             "text encoders): set method = \"textual_inversion\" for SDXL, or family = \"sd15\"")
    data_dir, _, _ = render._subsets(spec, root)
    tokens = plan_tokens(spec, data_dir, run_file)
    base = basemodel.resolve_base(spec.model.base, root, must_exist=False)
    out_dir = run_file.with_suffix("")
    run = TIRun(name, spec, run_file, root, out_dir, tokens, launch_args=render._launch_args(spec),
                base_path=base.path, data_dir=data_dir)
    ti = spec.textual_inversion
    script = TI_SCRIPTS[spec.model.family]
    env = render._environment()
    for token in tokens:
        folder = out_dir / "ti" / token.slug
        folder.mkdir(parents=True, exist_ok=True)
        output_dir = root / "output" / name / "ti"
        context = {
            "spec": spec, "ti": ti, "run_name": name, "run_file": render.project_path(run_file, root),
            "token": token.string, "base_path": render.project_path(base.path, root),
            "tokenizer_cache_dir": render.project_path(basemodel.tokenizer_cache_dir(root), root),
            "resolution_arg": f"{spec.resolution},{spec.resolution}",
            "output_dir": render.project_path(output_dir, root), "output_name": token.slug,
            "logging_dir": render.project_path(output_dir / "logs", root),
        }
        config = env.get_template("ti_config.toml.j2").render(context)
        texts = {"config.toml": config,
                 "dataset.toml": _fine_tuning_dataset(spec, list(token.images), folder, root, spec.resolution,
                                                      ti.batch_size or spec.train.batch_size, 1, [])}
        for filename, text in texts.items():
            path = folder / filename
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                write_atomic(path, text)
        import tomllib

        keys = frozenset(render._flatten_keys(tomllib.loads(config)))
        rel = render.project_path(folder, root)
        run.phases.append(Phase(f"textual inversion {token.string}", script, folder, output_dir, token.slug,
                                ["--config_file", f"{rel}/config.toml", "--dataset_config", f"{rel}/dataset.toml"],
                                keys, token))
    if check_keys and run.phases:
        render.check_keys_against_kohya(script, set(run.phases[0].config_keys), run_file, project_root=root)
    return run


# ---- the derived base -------------------------------------------------------------------------------------


# ---- training ---------------------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    label: str
    returncode: int
    output: Path | None
    log_path: Path
    hint: str | None = None
    tail: list[str] = field(default_factory=list)
    argv: list[str] = field(default_factory=list)


@dataclass
class TIResult:
    name: str
    phases: list[PhaseResult]
    embeddings: dict[str, Path]  # token → kohya's phase-1 file
    lora: Path | None
    derived: DerivedBase | None
    manifest_path: Path

    @property
    def returncode(self) -> int:
        return next((p.returncode for p in self.phases if p.returncode != 0), 0)


def _launch(run: TIRun, phase: Phase, on_line: Any, lock_fd: int) -> PhaseResult:
    """One kohya run through train's launch path (process group, watchdog, log, hints, exit codes)."""
    sd_scripts, python = kohya.find_sd_scripts(run.root), kohya.find_python(run.root)
    argv = [str(python), *run.launch_args, str(sd_scripts / phase.script), *phase.script_args]
    log_path = phase.output_dir / ("train.log" if phase.token is None else f"{phase.output_name}.log")  # train.log: the LoRA's, as for method = "lora"
    result = kohya.launch(argv, cwd=run.root, log_path=log_path, env=kohya.kohya_env(project_root=run.root),
                          on_line=on_line, hold_fds=(lock_fd,) if lock_fd >= 0 else ())
    output = phase.output_dir / f"{phase.output_name}.safetensors"
    code, hint = result.returncode, kohya.hint_for(result.tail)
    if code == 0 and not output.is_file():
        code, hint = 1, hint or f"kohya exited 0 but wrote no {output.name}: read {log_path}"
    return PhaseResult(phase.label, code, output if code == 0 else None, log_path, hint, list(result.tail), argv)


def derived_key(run: TIRun, embeddings: dict[str, Path]) -> str:
    digest = hashlib.sha256(str(run.base_path.resolve()).encode())
    for token, path in embeddings.items():
        digest.update(token.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return f"{run.name}-{digest.hexdigest()[:12]}"


def render_lora_phase(run: TIRun, derived: DerivedBase, *, check_keys: bool = True) -> render.RenderedRun:
    """Phase 2: the run file's LoRA rendered into runs/<run>/lora/ on the derived base, captions with tokens."""
    spec, root = run.spec, run.root
    folder = run.out_dir / "lora"
    folder.mkdir(parents=True, exist_ok=True)
    entries = [entry for token in run.tokens for entry in token.images]
    vectors = spec.textual_inversion.num_vectors_per_token
    text = _fine_tuning_dataset(spec, entries, folder, root, spec.resolution, spec.train.batch_size, vectors, run.tokens)
    return render.render(run.run_file, project_root=root, out_dir=folder, check_keys=check_keys,
                         phase2={"base_path": derived.base, "tokenizer_cache_dir": derived.tokenizer_cache_dir,
                                 "dataset.toml": text})


def train_ti(run_file: Path, *, project_root: Path | None = None, on_line: Any = None, new: bool = False,
             break_lock: bool = False) -> TIResult:
    """Phase 1 (one kohya TI run per token), then, for ti_then_lora, the derived base and the LoRA.

    Phase-1 files already in output/<run>/ti/ from the same rendered config are kept (a re-run after a
    failed phase 2 does not retrain them); --new sets the whole output folder aside first.
    """
    from dermkohya import train

    root = (project_root or Path.cwd()).resolve()
    with train.run_lock(run_file, project_root=root, break_lock=break_lock) as held:
        run = render_ti(run_file, project_root=root)
        output_dir = root / "output" / run.name
        if (output_dir / f"{run.name}.safetensors").exists() or (output_dir / "ti-manifest.json").exists():
            if not new:
                raise DermkohyaError(f"{output_dir} holds a finished run: `dermkohya collect {run_file}` it, or pass "
                                     "--new to keep it as output/<run>.N and start afresh")
            train._set_aside(output_dir)
        if run.spec.model.base.startswith("random:"):
            basemodel.ensure_smoke_model(run.spec.model.family, cache_root=root / render.SMOKE_MODELS_DIR)
        basemodel.build_tokenizer_cache(basemodel.tokenizer_cache_dir(root))
        results: list[PhaseResult] = []
        embeddings: dict[str, Path] = {}
        manifest: dict[str, Any] = {"run_name": run.name, "method": run.spec.method,
                                    "textual_inversion": run.spec.textual_inversion.model_dump(mode="json"),
                                    "tokens": [{"token": t.string, "diagnosis": t.diagnosis, "fst": t.fst,
                                                "images": len(t.images)} for t in run.tokens]}
        manifest_path = output_dir / "ti-manifest.json"
        for phase in run.phases:
            outcome = _launch(run, phase, on_line, held.fd)
            results.append(outcome)
            if outcome.returncode != 0:
                return _finish(run, results, embeddings, None, None, manifest, manifest_path)
            assert phase.token is not None and outcome.output is not None
            embeddings[phase.token.string] = outcome.output
        if run.spec.method == "textual_inversion":
            return _finish(run, results, embeddings, None, None, manifest, manifest_path)
        vectors = run.spec.textual_inversion.num_vectors_per_token
        dest = basemodel.models_dir(root) / "derived" / derived_key(run, embeddings)
        derived = build_derived_base(run.base_path, basemodel.tokenizer_cache_dir(root),
                                     [(t.strings(vectors), embeddings[t.string]) for t in run.tokens], dest)
        rendered = render_lora_phase(run, derived)
        phase = Phase("LoRA", run.spec.script, rendered.out_dir, rendered.output_dir, run.name, rendered.script_args,
                      rendered.config_keys)
        outcome = _launch(run, phase, on_line, held.fd)
        results.append(outcome)
        result = _finish(run, results, embeddings, outcome.output, derived, manifest, manifest_path)
        write_lora_manifest(run, rendered, outcome, manifest)
        return result


def write_lora_manifest(run: TIRun, rendered: render.RenderedRun, outcome: PhaseResult, ti_manifest: dict[str, Any]) -> Path:
    """output/<run>/manifest.json for the LoRA phase, as train writes it for a LoRA run (collect reads it),
    with the base it was derived from and the tokens (the card's trigger words)."""
    manifest = manifests.launch_from(json.loads(json.dumps(rendered.manifest)))
    manifest["dataset"]["trigger_words"] = [t.string for t in run.tokens]
    manifest["base_model"] |= {"derived_from": render.project_path(run.base_path, run.root),
                               "sha256": basemodel.sha256_path(run.base_path)}
    manifest |= {"exit_code": outcome.returncode, "command": outcome.argv,
                 "textual_inversion": {k: ti_manifest[k] for k in ("tokens", "embeddings", "init_word", "derived_base")}
                 | {"token_scope": run.spec.textual_inversion.token_scope}}
    path = rendered.output_dir / "manifest.json"
    manifests.LaunchManifest.model_validate(manifest).write(path)
    return path


def _finish(run: TIRun, results: list[PhaseResult], embeddings: dict[str, Path], lora: Path | None,
            derived: DerivedBase | None, manifest: dict[str, Any], path: Path) -> TIResult:
    """Record what the phases did in output/<run>/ti-manifest.json (collect reads it)."""
    manifest |= {
        "returncode": next((r.returncode for r in results if r.returncode != 0), 0),
        "phases": [{"label": r.label, "exit_code": r.returncode, "output": render.project_path(r.output, run.root) if r.output else None,
                    "log": render.project_path(r.log_path, run.root)} for r in results],
        "embeddings": {t: {"path": render.project_path(p, run.root), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                       for t, p in embeddings.items()},
        "init_word": run.spec.textual_inversion.init_word,
        "derived_base": None if derived is None else {
            "path": render.project_path(derived.base, run.root),
            "tokenizer_cache_dir": render.project_path(derived.tokenizer_cache_dir, run.root),
            "text_encoder_tokenizer_sha256": derived.sha256, "token_ids": derived.token_ids},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return TIResult(run.name, results, embeddings, lora, derived, path)


# ---- collect --------------------------------------------------------------------------------------------


def _ti_manifest(root: Path, name: str) -> dict[str, Any] | None:
    path = root / "output" / name / "ti-manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def embeddings_only(root: Path, name: str) -> bool:
    """A `method = "textual_inversion"` run: collect files its embeddings and no LoRA."""
    manifest = _ti_manifest(root, name)
    return manifest is not None and manifest.get("method") == "textual_inversion"


def collect_embeddings(root: Path, name: str) -> Path:
    """File phase 1's embeddings as artifacts/<run>/<run>-embeddings/<token-slug>.safetensors.

    One file per token, in kohya's own format (`emb_params`, [vectors, 768]): diffusers'
    `load_textual_inversion` and A1111 load exactly that, while neither reads a bundle of several tokens.
    The header gains `dermkohya.*` keys (token, its cell, init word, phase hashes); the tensors are copied
    unchanged. A file already filed with the same bytes is kept; a different one is never replaced.
    """
    from dermkohya import lora

    manifest = _ti_manifest(root, name)
    if manifest is None or manifest.get("returncode", 0) != 0 or not manifest.get("embeddings"):
        raise DermkohyaError(f"{root / 'output' / name / 'ti-manifest.json'}: no finished textual inversion to collect; "
                             f"train the run first (`dermkohya train runs/{name}.toml`)")
    folder = root / "artifacts" / name / f"{name}-embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    cells = {t["token"]: t for t in manifest["tokens"]}
    derived = manifest.get("derived_base") or {}
    for token, entry in sorted(manifest["embeddings"].items()):
        source = root / entry["path"]
        sf = lora.read_header(source)
        metadata = {
            "dermkohya.run_name": name, "dermkohya.method": manifest["method"], "dermkohya.token": token,
            "dermkohya.diagnosis": cells[token]["diagnosis"], "dermkohya.fst": cells[token]["fst"] or "",
            "dermkohya.token_scope": manifest["textual_inversion"]["token_scope"],
            "dermkohya.init_word": manifest.get("init_word") or "",
            "dermkohya.num_vectors_per_token": str(manifest["textual_inversion"]["num_vectors_per_token"]),
            "dermkohya.phase1_sha256": entry["sha256"],
            "dermkohya.derived_base_sha256": derived.get("text_encoder_tokenizer_sha256") or "",
        }
        dest = folder / f"{slug(token) or 'token'}.safetensors"
        tmp = folder / f".{dest.name}.tmp-{os.getpid()}"
        lora.write_with_metadata(sf, {**sf.metadata, **metadata}, tmp)
        if dest.exists():
            same = dest.read_bytes() == tmp.read_bytes()
            tmp.unlink()
            if not same:
                raise DermkohyaError(f"{dest}: already holds a different embedding for {token}; it is never replaced: "
                                     f"move artifacts/{name} aside to collect this one")
            continue
        lora.publish(tmp, dest)
    return folder


def train_result(run_file: Path, *, project_root: Path | None = None, resume: bool = False, new: bool = False,
                 on_line: Any = None, break_lock: bool = False, gpu_ids: str | None = None) -> Any:
    """`train.train` for a TI method: the phases' outcome as the TrainResult the CLI and the queue print."""
    from dermkohya import runstate, train

    if resume or gpu_ids is not None:
        raise DermkohyaError(f"{run_file}: --resume and --gpus are not supported for textual inversion yet: train it "
                             "with `dermkohya train` alone (finished phase-1 runs are quick to redo)")
    result = train_ti(run_file, project_root=project_root, on_line=on_line, new=new, break_lock=break_lock)
    last = result.phases[-1]
    ok = result.returncode == 0
    return train.TrainResult(
        name=result.name, lora=(result.lora or last.log_path.parent) if ok else None,  # TI alone: the embeddings' folder returncode=result.returncode, interrupted=False,
        log_path=last.log_path, manifest_path=result.manifest_path, hint=last.hint, tail=last.tail,
        state=runstate.RunState.FINISHED if ok else runstate.RunState.FAILED)
