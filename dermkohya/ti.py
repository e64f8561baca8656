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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from dermkohya import basemodel, dataset, kohya, manifests, render, runstate, ti_resume
from dermkohya.dataset.sidecar import read_metadata
from dermkohya.errors import DermkohyaError
from dermkohya.files import sha256_file, write_atomic
from dermkohya.manifests import DerivedBasePart, TIEmbedding, TIManifest, TIPhase, TIToken
from dermkohya.resume import _resume_done, saved_states
from dermkohya.spec import RunSpec, load_run
from dermkohya.names import slug
from dermkohya.templating import text_template
from dermkohya.embeddings import DerivedBase, build_derived_base, diffusers_from_single_file

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


def _fine_tuning_dataset(spec: RunSpec, entries: list[tuple[Path, int, str]], folder: Path, root: Path, *,
                         what: str, batch_size: int, validation_split: float, vectors: int, tokens: list[Token]) -> str:
    """A --dataset_config of kohya fine-tuning subsets (one per image folder and repeat count), rendered by
    render's one dataset renderer; the captions come from metadata files written into `folder`, never from
    the user's caption files."""
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
        subsets.append(render.Subset(render.project_path(image_dir, root), repeats, "", render.project_path(meta, root)))
    return render.dataset_config(spec.dataset, what=what, source=render.project_path(folder, root),
                                 resolution=spec.resolution, batch_size=batch_size, validation_split=validation_split,
                                 subsets=subsets)


def render_ti(run_file: Path, *, project_root: Path | None = None, check_keys: bool = True) -> TIRun:
    """Write runs/<run>/ti/<token>/ (config.toml, dataset.toml, captions) for every phase-1 run; phase 2's
    files are rendered by `render_lora_phase` once the derived base exists (its path is part of them)."""
    root = (project_root or Path.cwd()).resolve()
    run_file = run_file if run_file.is_absolute() else root / run_file
    spec, name = load_run(run_file)
    if spec.method == "lora":
        raise DermkohyaError(f"{run_file}: method is \"lora\": render it with `dermkohya render`")
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
                 "dataset.toml": _fine_tuning_dataset(
                     spec, list(token.images), folder, root, what=f"phase 1 of run `{name}` (textual inversion of {token.string})",
                     batch_size=ti.batch_size or spec.train.batch_size, validation_split=0.0, vectors=1, tokens=[])}
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
    interrupted: bool = False


@dataclass
class TIResult:
    name: str
    phases: list[PhaseResult]
    embeddings: dict[str, Path]  # token → kohya's phase-1 file (kept or trained now)
    lora: Path | None
    derived: DerivedBase | None
    manifest_path: Path
    lora_manifest: Path | None = None  # output/<run>/manifest.json, once phase 2 was launched
    warnings: list[str] = field(default_factory=list)
    note: str | None = None  # why nothing was launched (a --resume with nothing left)

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
    return PhaseResult(phase.label, code, output if code == 0 else None, log_path, hint, list(result.tail), argv,
                       result.interrupted)


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
    text = _fine_tuning_dataset(spec, entries, folder, root, what=f"phase 2 of run `{run.name}` (LoRA with the learned tokens)",
                                batch_size=spec.train.batch_size, validation_split=spec.validation.split, vectors=vectors,
                                tokens=run.tokens)
    return render.render(run.run_file, project_root=root, out_dir=folder, check_keys=check_keys,
                         phase2={"base_path": derived.base, "tokenizer_cache_dir": derived.tokenizer_cache_dir,
                                 "dataset.toml": text})


def _new_record(run: TIRun) -> TIManifest:
    ti = run.spec.textual_inversion
    return TIManifest(run_name=run.name, method=run.spec.method, textual_inversion=ti.model_dump(mode="json"),
                      init_word=ti.init_word, tokens=[TIToken(token=t.string, diagnosis=t.diagnosis, fst=t.fst,
                                                              images=len(t.images)) for t in run.tokens])


def _phase_record(run: TIRun, outcome: PhaseResult, token: str | None, rendered_sha256: str) -> TIPhase:
    return TIPhase(label=outcome.label, token=token, exit_code=outcome.returncode, interrupted=outcome.interrupted,
                   output=render.project_path(outcome.output, run.root) if outcome.output else None,
                   log=render.project_path(outcome.log_path, run.root), rendered_sha256=rendered_sha256)


def train_ti(run_file: Path, *, project_root: Path | None = None, on_line: Any = None, new: bool = False,
             resume: bool = False, break_lock: bool = False, gpu_ids: str | None = None) -> TIResult:
    """Phase 1 (one kohya TI run per token), then, for ti_then_lora, the derived base and the LoRA.

    output/<run>/ti-manifest.json is written after every phase. --resume continues an interrupted launch:
    a phase-1 embedding from the same inputs is kept, an interrupted token is trained again (phase-1 runs
    save no state), and phase 2 continues from kohya's last saved state when there is one. --gpus gives
    every phase the queue's GPU(s). --new sets the whole output folder aside first.
    """
    from dermkohya import train

    root = (project_root or Path.cwd()).resolve()
    with train.run_lock(run_file, project_root=root, break_lock=break_lock) as held:
        run = render_ti(run_file, project_root=root)
        if gpu_ids is not None:
            run.launch_args = train._with_gpu_ids(run.launch_args, gpu_ids,
                                                  run.spec.launch.processes * run.spec.launch.machines, run.run_file)
        output_dir = root / "output" / run.name
        previous = ti_resume.previous_launch(run, output_dir, resume=resume, new=new)
        if new and not resume and output_dir.exists():
            train._set_aside(output_dir)
        if run.spec.model.base.startswith("random:"):
            basemodel.ensure_smoke_model(run.spec.model.family, cache_root=root / render.SMOKE_MODELS_DIR)
        basemodel.build_tokenizer_cache(basemodel.tokenizer_cache_dir(root))
        base_sha256 = basemodel.sha256_path(run.base_path)
        record, path = _new_record(run), output_dir / "ti-manifest.json"
        results: list[PhaseResult] = []
        for phase in run.phases:
            assert phase.token is not None
            digest = ti_resume.phase_sha256(phase, base_sha256)
            kept = ti_resume.kept_embedding(previous, phase.token.string, digest, root)
            if kept is None:
                outcome = _launch(run, phase, on_line, held.fd)
                results.append(outcome)
                record.phases.append(_phase_record(run, outcome, phase.token.string, digest))
                if outcome.returncode != 0:
                    return _finish(run, record, path, results)
                assert outcome.output is not None
                kept = TIEmbedding(path=render.project_path(outcome.output, root), sha256=sha256_file(outcome.output),
                                   rendered_sha256=digest)
            else:
                record.phases.append(TIPhase(label=phase.label, token=phase.token.string, exit_code=0, kept=True,
                                             output=kept.path, log=None, rendered_sha256=digest))
            record.embeddings[phase.token.string] = kept
            record.write(path)  # a finished token is on record before the next one starts
        if run.spec.method == "textual_inversion":
            return _finish(run, record, path, results)
        return _lora_phase(run, record, path, results, on_line=on_line, lock_fd=held.fd, resume=resume, gpu_ids=gpu_ids)


def _lora_phase(run: TIRun, record: TIManifest, path: Path, results: list[PhaseResult], *, on_line: Any,
                lock_fd: int, resume: bool, gpu_ids: str | None) -> TIResult:
    """Phase 2: the derived base, the LoRA's files on it, and its launch (continuing kohya's saved state on
    a --resume)."""
    root = run.root
    embeddings = {t: root / e.path for t, e in record.embeddings.items()}
    vectors = run.spec.textual_inversion.num_vectors_per_token
    dest = basemodel.models_dir(root) / "derived" / derived_key(run, embeddings)
    derived = build_derived_base(phase2_base(run), basemodel.tokenizer_cache_dir(root),
                                 [(t.strings(vectors), embeddings[t.string]) for t in run.tokens], dest)
    record.derived_base = DerivedBasePart(path=render.project_path(derived.base, root),
                                          tokenizer_cache_dir=render.project_path(derived.tokenizer_cache_dir, root),
                                          text_encoder_tokenizer_sha256=derived.sha256, token_ids=derived.token_ids)
    rendered = render_lora_phase(run, derived)
    phase = Phase("LoRA", run.spec.script, rendered.out_dir, rendered.output_dir, run.name, list(rendered.script_args),
                  rendered.config_keys)
    warnings: list[str] = []
    state = ti_resume.lora_state(run, rendered, warnings) if resume else None
    if state is not None:
        done = _resume_done(rendered, state)
        if done is not None:
            result = _finish(run, record, path, results)
            result.note, result.warnings = done, warnings
            return result
        phase.script_args += ["--resume", render.project_path(state, root)]
    outcome = _launch(run, phase, on_line, lock_fd)
    results.append(outcome)
    record.phases.append(_phase_record(run, outcome, None, rendered.manifest["rendered_sha256"].get("config.toml", "")))
    lora_manifest = write_lora_manifest(run, rendered, outcome, record, resumed_from=state, gpu_ids=gpu_ids)
    result = _finish(run, record, path, results, lora=outcome.output, derived=derived)
    result.lora_manifest, result.warnings = lora_manifest, warnings
    return result


def phase2_base(run: TIRun) -> Path:
    """The diffusers folder the derived base is built from: the base itself, or a single-file checkpoint
    converted once (phase 1 trained on the same weights: kohya reads the single file)."""
    if (run.base_path / "model_index.json").is_file():
        return run.base_path
    return diffusers_from_single_file(run.base_path, run.spec.model.family, basemodel.models_dir(run.root))


def write_lora_manifest(run: TIRun, rendered: render.RenderedRun, outcome: PhaseResult, record: TIManifest, *,
                        resumed_from: Path | None = None, gpu_ids: str | None = None) -> Path:
    """output/<run>/manifest.json for the LoRA phase, as train writes it for a LoRA run (collect reads it),
    with the base it was derived from and the tokens (the card's trigger words)."""
    manifest = manifests.launch_from(json.loads(json.dumps(rendered.manifest)))
    manifest["dataset"]["trigger_words"] = [t.string for t in run.tokens]
    manifest["base_model"] |= {"derived_from": render.project_path(run.base_path, run.root),
                               "sha256": basemodel.sha256_path(run.base_path)}
    facts = record.model_dump(mode="json", include={"tokens", "embeddings", "init_word", "derived_base"})
    manifest |= {"exit_code": outcome.returncode, "command": outcome.argv, "interrupted": outcome.interrupted,
                 "state": runstate.ended(outcome.returncode, outcome.output is not None, None).value,
                 "resumed_from": render.project_path(resumed_from, run.root) if resumed_from else None,
                 "gpu_override": None if gpu_ids is None else {"gpu_ids": gpu_ids, "run_file_gpu_ids": run.spec.launch.gpu_ids,
                                                               "by": "--gpus"},
                 "textual_inversion": facts | {"token_scope": run.spec.textual_inversion.token_scope}}
    path = rendered.output_dir / "manifest.json"
    manifests.LaunchManifest.model_validate(manifest).write(path)
    return path


def _finish(run: TIRun, record: TIManifest, path: Path, results: list[PhaseResult], *, lora: Path | None = None,
            derived: DerivedBase | None = None) -> TIResult:
    """Record how the phases ended in output/<run>/ti-manifest.json (collect reads it)."""
    record.returncode = next((r.returncode for r in results if r.returncode != 0), 0)
    record.finished = record.returncode == 0 and (run.spec.method == "textual_inversion" or lora is not None)
    path.parent.mkdir(parents=True, exist_ok=True)
    record.write(path)
    embeddings = {t: run.root / e.path for t, e in record.embeddings.items()}
    return TIResult(run.name, results, embeddings, lora, derived, path)


def train_result(run_file: Path, *, project_root: Path | None = None, resume: bool = False, new: bool = False,
                 on_line: Any = None, break_lock: bool = False, gpu_ids: str | None = None) -> Any:
    """`train.train` for a TI method: the phases' outcome as the TrainResult the CLI and the queue print."""
    from dermkohya import train

    result = train_ti(run_file, project_root=project_root, on_line=on_line, new=new, resume=resume,
                      break_lock=break_lock, gpu_ids=gpu_ids)
    last = result.phases[-1] if result.phases else None
    ok = result.returncode == 0
    output_dir = result.manifest_path.parent
    return train.TrainResult(
        name=result.name, lora=(result.lora or output_dir / "ti") if ok else None,  # TI alone: the embeddings' folder
        returncode=result.returncode, interrupted=bool(last and last.interrupted),
        log_path=last.log_path if last else output_dir / "train.log",
        manifest_path=result.lora_manifest or result.manifest_path, hint=last.hint if last else None,
        tail=last.tail if last else [], warnings=result.warnings, note=result.note,
        saved_states=saved_states(output_dir, result.name),
        state=runstate.ended(result.returncode, ok, None) if last else runstate.RunState.FINISHED)
