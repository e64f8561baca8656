"""Textual inversion then LoRA (ti.py): tokens from the dataset, phase captions, the derived base, collect,
inspect; and, marked `kohya`, runs/demo-ti.toml end to end on the smoke model with a check inside kohya's
environment that phase 2's text encoder holds the learned vectors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from _smoke import smoke_sd15_model  # noqa: F401  (session fixture: the shared smoke model)
from test_single_file import single_file_sd15  # noqa: F401  (session fixture: the smoke model as one checkpoint)

from dermkohya import basemodel, collect, demo, embeddings, ti
from dermkohya.errors import DermkohyaError
from dermkohya.lora import read_header

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_kohya(monkeypatch: pytest.MonkeyPatch) -> None:
    """Test projects live outside the repo: they use this checkout's sd-scripts and kohya Python."""
    from dermkohya import kohya

    monkeypatch.setenv("SD_SCRIPTS_DIR", str(kohya.find_sd_scripts(REPO)))
    monkeypatch.setenv("KOHYA_PYTHON", str(kohya.find_python(REPO)))


def _project(root: Path, *, scope: str = "diagnosis", extra: str = "") -> Path:
    (root / "runs").mkdir(parents=True)
    text = (REPO / "runs" / "demo-ti.toml").read_text().replace('token_scope = "diagnosis"', f'token_scope = "{scope}"')
    (root / "runs" / "demo-ti.toml").write_text(text + extra)
    demo.make_demo_dataset(root / "datasets" / "demo" / "data", per_cell=1, size=64)
    return root


def _captions(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in (root / "datasets").rglob("*.txt")}


def test_tokens_per_diagnosis_and_per_cell_with_captions_rendered_apart(tmp_path: Path) -> None:
    root = _project(tmp_path / "d")
    before = _captions(root)
    run = ti.render_ti(Path("runs/demo-ti.toml"), project_root=root, check_keys=False)
    assert [t.string for t in run.tokens] == ["<erythema-patch>", "<pustule-like-dots>", "<scaly-plaque>"]
    assert all(t.fst is None and len(t.images) == 6 for t in run.tokens)
    config = (root / "runs" / "demo-ti" / "ti" / "scaly-plaque" / "config.toml").read_text()
    assert 'token_string = "<scaly-plaque>"' in config and 'init_word = "skin"' in config
    captions = json.loads((root / "runs" / "demo-ti" / "ti" / "scaly-plaque" / "captions-0.json").read_text())
    assert len(captions) == 6 and all(c["caption"].startswith("<scaly-plaque>, clinical") for c in captions.values())
    assert _captions(root) == before, "the user's caption files must never be edited"

    cells = ti.render_ti(Path("runs/demo-ti.toml"), project_root=_project(tmp_path / "c", scope="cell"), check_keys=False)
    assert len(cells.tokens) == 18 and cells.tokens[0].string == "<erythema-patch-fst-i>" and cells.tokens[0].fst == "I"


def test_a_token_template_that_merges_cells_or_drops_the_token_is_refused(tmp_path: Path) -> None:
    root = _project(tmp_path / "a", scope="cell", extra="")
    text = (root / "runs" / "demo-ti.toml").read_text()
    (root / "runs" / "demo-ti.toml").write_text(text.replace('init_word = "skin"', 'init_word = "skin"\ntoken_template = "<{{ diagnosis | slug }}>"'))
    with pytest.raises(DermkohyaError, match="two cells"):
        ti.render_ti(Path("runs/demo-ti.toml"), project_root=root, check_keys=False)
    (root / "runs" / "demo-ti.toml").write_text(text.replace('init_word = "skin"', 'init_word = "skin"\ncaption_template = "{{ caption }}"'))
    with pytest.raises(DermkohyaError, match="without the token"):
        ti.render_ti(Path("runs/demo-ti.toml"), project_root=root, check_keys=False)


def _tiny_base(folder: Path) -> Path:
    """A diffusers-shaped folder with a small CLIP text encoder (the derived base touches nothing else)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=77)
    CLIPTextModel(config).save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    (folder / "unet").mkdir()
    (folder / "unet" / "weights.bin").write_bytes(b"unet")
    (folder / "model_index.json").write_text("{}")
    return folder


def _embedding(path: Path, vectors: np.ndarray, token: str | None = None) -> Path:
    from safetensors.numpy import save_file

    save_file({"emb_params": vectors.astype(np.float32)}, str(path), metadata={"dermkohya.token": token} if token else None)
    return path


def test_derived_base_holds_the_learned_rows_and_a_tokenizer_that_knows_the_tokens(tmp_path: Path) -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    base = _tiny_base(tmp_path / "base")
    cache = basemodel.build_tokenizer_cache(tmp_path / "tokenizers")
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1, 32)), rng.normal(size=(2, 32))
    derived = ti.build_derived_base(base, cache, [(["<a>"], _embedding(tmp_path / "a.safetensors", a)),
                                                  (["<b>", "<b>1"], _embedding(tmp_path / "b.safetensors", b))],
                                    tmp_path / "derived")
    assert derived.token_ids == {"<a>": [49408], "<b>": [49409, 49410]}
    assert os.path.samefile(derived.base / "unet" / "weights.bin", base / "unet" / "weights.bin")  # a hard link
    encoder = CLIPTextModel.from_pretrained(str(derived.base / "text_encoder"))
    rows = encoder.get_input_embeddings().weight.detach().numpy()
    assert rows.shape[0] == 49411 and np.array_equal(rows[49408], a[0].astype(np.float32))
    assert np.array_equal(rows[49409:49411], b.astype(np.float32))
    tokenizer = CLIPTokenizer.from_pretrained(str(derived.tokenizer_cache_dir / embeddings.CLIP_L_DIR))
    ids = tokenizer("<a> on skin, <b> <b>1").input_ids
    assert ids[1] == 49408 and ids[-3:-1] == [49409, 49410]
    with pytest.raises(DermkohyaError, match="not a diffusers folder"):
        ti.build_derived_base(tmp_path / "a.safetensors", cache, [], tmp_path / "x")


def _tiny_sdxl_derived(tmp_path: Path) -> tuple[Path, Path, ti.DerivedBase, np.ndarray, np.ndarray]:
    """A tiny SDXL-shaped base (CLIP-L 32-wide, bigG-like 48-wide with projection) and its derived base for
    one two-vector token from a file in kohya's SDXL TI format."""
    from safetensors.numpy import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    base = _tiny_base(tmp_path / "base")
    config = CLIPTextConfig(vocab_size=49408, hidden_size=48, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=16)
    CLIPTextModelWithProjection(config).save_pretrained(str(base / "text_encoder_2"), safe_serialization=True)
    cache = basemodel.build_tokenizer_cache(tmp_path / "tokenizers")
    rng = np.random.default_rng(0)
    l, g = rng.normal(size=(2, 32)).astype(np.float32), rng.normal(size=(2, 48)).astype(np.float32)
    save_file({"clip_l": l, "clip_g": g}, str(tmp_path / "t.safetensors"))
    derived = ti.build_derived_base(base, cache, [(["<t>", "<t>1"], tmp_path / "t.safetensors")], tmp_path / "derived")
    return base, cache, derived, l, g


def test_sdxl_derived_base_holds_the_rows_in_both_text_encoders_with_the_same_ids(tmp_path: Path) -> None:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base, cache, derived, l, g = _tiny_sdxl_derived(tmp_path)
    rng = np.random.default_rng(1)
    assert derived.token_ids == {"<t>": [49408, 49409]}
    first = CLIPTextModel.from_pretrained(str(derived.base / "text_encoder")).get_input_embeddings().weight.detach().numpy()
    second = CLIPTextModelWithProjection.from_pretrained(str(derived.base / "text_encoder_2"))
    assert np.array_equal(first[49408:], l) and np.array_equal(second.get_input_embeddings().weight.detach().numpy()[49408:], g)
    for folder in (derived.base / "tokenizer_2", derived.tokenizer_cache_dir / embeddings.CLIP_BIGG_DIR, derived.tokenizer_cache_dir / embeddings.CLIP_L_DIR):
        assert CLIPTokenizer.from_pretrained(str(folder)).convert_tokens_to_ids(["<t>", "<t>1"]) == [49408, 49409]
    _embedding(tmp_path / "sd15.safetensors", rng.normal(size=(1, 32)))
    with pytest.raises(DermkohyaError, match="no 48-wide `clip_g` vectors"):
        ti.build_derived_base(base, cache, [(["<s>"], tmp_path / "sd15.safetensors")], tmp_path / "x")


def test_generate_loads_kohyas_sdxl_embedding_into_both_text_encoders(tmp_path: Path) -> None:
    """diffusers' own load_textual_inversion (the mixin every SD pipeline has) on tiny CLIP-L / bigG-shaped
    encoders: `clip_l` goes to the first, `clip_g` to the second, under the file's recorded token."""
    from types import SimpleNamespace

    from diffusers import DiffusionPipeline
    from diffusers.loaders import TextualInversionLoaderMixin
    from safetensors.numpy import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    class TextOnlyXLPipeline(DiffusionPipeline, TextualInversionLoaderMixin):  # SDXL's text half, as diffusers registers it
        def __init__(self, tokenizer: object, tokenizer_2: object, text_encoder: object, text_encoder_2: object) -> None:
            super().__init__()
            self.register_modules(tokenizer=tokenizer, tokenizer_2=tokenizer_2, text_encoder=text_encoder,
                                  text_encoder_2=text_encoder_2)

    cache = basemodel.build_tokenizer_cache(tmp_path / "tokenizers")
    shape = {"vocab_size": 49408, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 4}
    pipe = TextOnlyXLPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(str(cache / embeddings.CLIP_L_DIR)),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(cache / embeddings.CLIP_BIGG_DIR)),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=32, **shape)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, projection_dim=16, **shape)))
    rng = np.random.default_rng(2)
    l, g = rng.normal(size=(1, 32)).astype(np.float32), rng.normal(size=(1, 48)).astype(np.float32)
    save_file({"clip_l": l, "clip_g": g}, str(tmp_path / "t.safetensors"), metadata={"dermkohya.token": "<t>"})
    assert embeddings.load_embeddings(pipe, [SimpleNamespace(path=str(tmp_path / "t.safetensors"), token=None)]) == ["<t>"]
    for tokenizer, encoder, rows in ((pipe.tokenizer, pipe.text_encoder, l), (pipe.tokenizer_2, pipe.text_encoder_2, g)):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<t>")].detach().numpy()
        assert np.array_equal(row, rows[0])


@pytest.mark.kohya
def test_kohyas_sdxl_tokenizers_read_the_derived_cache_with_the_new_ids(tmp_path: Path, repo_kohya: None) -> None:
    """sdxl_train_network.py tokenizes captions with SdxlTokenizeStrategy from --tokenizer_cache_dir: both of
    its tokenizers, loaded by kohya's own code from the derived cache, give the new tokens the rows' ids."""
    from dermkohya import kohya

    _, _, derived, _, _ = _tiny_sdxl_derived(tmp_path)
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from library import strategy_sdxl; "
            "s = strategy_sdxl.SdxlTokenizeStrategy(75, sys.argv[2]); a, b = s.tokenize('<t> <t>1, skin'); "
            "print('IDS ' + json.dumps([a.flatten()[:4].tolist(), b.flatten()[:4].tolist()]))")
    out = subprocess.run([str(kohya.find_python(REPO)), "-c", code, str(kohya.find_sd_scripts(REPO)), str(derived.tokenizer_cache_dir)],
                         env=kohya.kohya_env(), capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("IDS ")]
    assert out.returncode == 0 and lines, out.stderr[-2000:]
    first, second = json.loads(lines[-1].removeprefix("IDS "))
    assert first[:3] == second[:3] == [49406, 49408, 49409]


def test_collect_files_one_embedding_per_token_with_provenance_and_inspect_reads_it(tmp_path: Path) -> None:
    root = tmp_path
    out = root / "output" / "r" / "ti"
    out.mkdir(parents=True)
    emb = _embedding(out / "scaly-plaque.safetensors", np.ones((1, 768)))
    from dermkohya.manifests import TIManifest

    TIManifest.model_validate({
        "run_name": "r", "method": "textual_inversion", "returncode": 0, "finished": True, "init_word": "skin",
        "textual_inversion": {"token_scope": "diagnosis", "num_vectors_per_token": 1},
        "tokens": [{"token": "<scaly-plaque>", "diagnosis": "scaly plaque", "fst": None, "images": 6}],
        "embeddings": {"<scaly-plaque>": {"path": "output/r/ti/scaly-plaque.safetensors", "sha256": "0" * 64,
                                          "rendered_sha256": "1" * 64}},
    }).write(root / "output" / "r" / "ti-manifest.json")
    folder = collect.collect("r", project_root=root)
    filed = folder / "scaly-plaque.safetensors"
    assert folder == root / "artifacts" / "r" / "r-embeddings" and filed.is_file()
    meta = read_header(filed).metadata
    assert meta["dermkohya.token"] == "<scaly-plaque>" and meta["dermkohya.diagnosis"] == "scaly plaque"
    assert read_header(filed).tensors["emb_params"].shape == (1, 768)
    assert filed.read_bytes()[-768 * 4:] == emb.read_bytes()[-768 * 4:]
    summary = collect.inspect(filed)
    assert summary["kind"] == "textual inversion embedding" and summary["token"] == "<scaly-plaque>" and summary["vectors"] == 1
    assert collect.collect("r", project_root=root) == folder  # the same bytes again: kept, not duplicated
    assert embeddings.embedding_files(folder) == [(filed, "<scaly-plaque>")]


@pytest.mark.kohya
@pytest.mark.parametrize("run", ["derm-sd15-ti", "derm-sdxl-ti"])
def test_shipped_ti_run_files_render_keys_kohyas_own_parser_accepts(tmp_path: Path, run: str, repo_kohya: None) -> None:
    root = tmp_path
    (root / "runs").mkdir()
    text = (REPO / "runs" / f"{run}.toml").read_text().replace('prepared = "datasets/derm"', 'train_data_dir = "data"')
    (root / "runs" / f"{run}.toml").write_text(text)
    demo.make_demo_dataset(root / "data", per_cell=1, size=64)
    rendered = ti.render_ti(Path(f"runs/{run}.toml"), project_root=root, check_keys=True)
    assert rendered.phases[0].script == ("sdxl_train_textual_inversion.py" if "sdxl" in run else "train_textual_inversion.py")
    assert len(rendered.tokens) == (18 if run == "derm-sd15-ti" else 3)
    from dermkohya import kohya

    assert kohya.cached_argument_names(rendered.phases[0].script, root) is not None  # the check ran, not skipped
    phase2 = ti.render_lora_phase(rendered, ti.DerivedBase(root / "models" / "derived", root / "models" / "tokenizers", "", {}))
    assert phase2.spec.script == ("sdxl_train_network.py" if "sdxl" in run else "train_network.py")
    assert kohya.cached_argument_names(phase2.spec.script, root) is not None  # phase 2's keys checked by its parser


@pytest.mark.kohya
def test_phase_dataset_configs_are_fine_tuning_subsets_kohya_reads(tmp_path: Path, repo_kohya: None) -> None:
    """Both phases' dataset.toml come from render's one renderer; kohya's own dataset group (tests/kohya_datasets.py)
    reads them as fine-tuning subsets whose captions are the metadata files, with every image."""
    from dermkohya import kohya

    root = _project(tmp_path / "p")
    run = ti.render_ti(Path("runs/demo-ti.toml"), project_root=root, check_keys=False)
    ti.render_lora_phase(run, ti.DerivedBase(root / "models" / "derived", root / "models" / "tokenizers", "", {}),
                         check_keys=False)
    configs = [run.phases[0].out_dir / "dataset.toml", run.out_dir / "lora" / "dataset.toml"]
    assert all("rendered by dermkohya" in c.read_text() and "metadata_file" in c.read_text() for c in configs)
    sd_scripts = kohya.find_sd_scripts(REPO)
    env = kohya.kohya_env(project_root=root)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(sd_scripts), env.get("PYTHONPATH")]))
    out = subprocess.run([str(kohya.find_python(REPO)), str(REPO / "tests" / "kohya_datasets.py"), *map(str, configs)],
                         cwd=root, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("DERMKOHYA-DATASETS ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    phase1, phase2 = json.loads(lines[-1].removeprefix("DERMKOHYA-DATASETS "))
    assert [(s["metadata_file"], s["images"]) for d in phase1 for s in d["subsets"]] == [
        ("runs/demo-ti/ti/erythema-patch/captions-0.json", 6)]
    assert [(s["metadata_file"], s["images"]) for d in phase2 for s in d["subsets"]] == [("runs/demo-ti/lora/captions-0.json", 18)]


@pytest.mark.kohya
@pytest.mark.slow
def test_phase_two_on_a_single_file_base_reads_the_learned_rows_in_kohya(tmp_path: Path, single_file_sd15: Path,
                                                                          repo_kohya: None) -> None:
    """A single-file checkpoint (the smoke model converted by sd-scripts' own tool) becomes, once, a diffusers
    folder with the same weights; the derived base is built on it, and kohya's phase-2 loader sees the rows."""
    from safetensors.torch import load_file

    from dermkohya import kohya

    root = _project(tmp_path / "p")
    run_file = root / "runs" / "demo-ti.toml"
    run_file.write_text(run_file.read_text().replace('base = "random:sd15"', 'base = "models/v1-5-pruned.safetensors"'))
    (root / "models").mkdir()
    (root / "models" / "v1-5-pruned.safetensors").symlink_to(single_file_sd15)
    run = ti.render_ti(Path("runs/demo-ti.toml"), project_root=root, check_keys=False)
    folder = ti.phase2_base(run)
    assert folder.parent == root / "models" / "diffusers" and ti.phase2_base(run) == folder  # built once
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    rows = load_file(str(folder / "text_encoder" / "model.safetensors"))["text_model.embeddings.token_embedding.weight"]
    assert rows.dtype == load_file(str(single_file_sd15))[key].dtype and rows.equal(load_file(str(single_file_sd15))[key])

    rng = np.random.default_rng(1)
    embeddings = {t.string: _embedding(tmp_path / f"{t.slug}.safetensors", rng.normal(size=(1, 768))) for t in run.tokens}
    basemodel.build_tokenizer_cache(basemodel.tokenizer_cache_dir(root))
    derived = ti.build_derived_base(folder, basemodel.tokenizer_cache_dir(root),
                                    [([token], path) for token, path in embeddings.items()], root / "models" / "derived" / "x")
    ti.render_lora_phase(run, derived, check_keys=False)
    lora_dir = root / "runs" / "demo-ti" / "lora"
    pairs = [str(x) for token, path in embeddings.items() for x in (token, path)]
    check = subprocess.run([str(kohya.find_python(root)), str(REPO / "tests" / "_ti_check.py"), str(kohya.find_sd_scripts(root)),
                            str(lora_dir / "config.toml"), str(lora_dir / "dataset.toml"), str(lora_dir / "captions-0.json"), *pairs],
                           cwd=root, env=kohya.kohya_env(project_root=root), capture_output=True, text=True)
    lines = [line for line in check.stdout.splitlines() if line.startswith("TI-CHECK ")]
    assert check.returncode == 0 and lines, check.stdout[-2000:] + check.stderr[-2000:]
    assert json.loads(lines[-1].removeprefix("TI-CHECK "))["vocab"] == 49408 + 3


# ---- end to end with the real kohya ----------------------------------------------------------------------


@pytest.mark.kohya
@pytest.mark.slow
def test_demo_ti_trains_both_phases_and_phase_two_sees_the_learned_vectors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                               repo_kohya: None) -> None:
    from dermkohya import kohya

    root = _project(tmp_path / "p")
    run_file = root / "runs" / "demo-ti.toml"
    run_file.write_text(run_file.read_text().replace("max_steps = 2", "max_steps = 1"))  # one step per phase: minutes
    (root / "models").mkdir()
    (root / "models" / "smoke").symlink_to(basemodel.ensure_smoke_model("sd15")[0].parent)  # built once per machine
    result = ti.train_ti(Path("runs/demo-ti.toml"), project_root=root)
    assert result.returncode == 0, "\n".join(result.phases[-1].tail)
    assert [p.label for p in result.phases] == ["textual inversion <erythema-patch>", "textual inversion <pustule-like-dots>",
                                                "textual inversion <scaly-plaque>", "LoRA"]
    assert result.lora is not None and result.derived is not None

    # inside kohya's environment: phase 2's config loads the derived base and tokenizer with the learned rows
    lora_dir = root / "runs" / "demo-ti" / "lora"
    pairs = [str(x) for token, path in result.embeddings.items() for x in (token, path)]
    check = subprocess.run([str(kohya.find_python(root)), str(REPO / "tests" / "_ti_check.py"), str(kohya.find_sd_scripts(root)),
                            str(lora_dir / "config.toml"), str(lora_dir / "dataset.toml"), str(lora_dir / "captions-0.json"), *pairs],
                           cwd=root, env=kohya.kohya_env(project_root=root), capture_output=True, text=True)
    lines = [line for line in check.stdout.splitlines() if line.startswith("TI-CHECK ")]
    assert check.returncode == 0 and lines, check.stdout[-2000:] + check.stderr[-2000:]
    report = json.loads(lines[-1].removeprefix("TI-CHECK "))
    assert report["vocab"] == 49408 + 3
    assert all(t["equal"] and t["in_captions"] and t["trained"] for t in report["tokens"].values()), report

    artifact = collect.collect("demo-ti", project_root=root)
    assert artifact == root / "artifacts" / "demo-ti" / "demo-ti.safetensors"
    assert "<scaly-plaque>" in json.loads(read_header(artifact).metadata["dermkohya.textual_inversion"])["embeddings"]
    assert sorted(p.name for p in (root / "artifacts" / "demo-ti" / "demo-ti-embeddings").iterdir()) == [
        "erythema-patch.safetensors", "pustule-like-dots.safetensors", "scaly-plaque.safetensors"]
    assert "<scaly-plaque>" in (root / "artifacts" / "demo-ti" / "model_card.md").read_text()

    # generate: tokens + LoRA on the base, a balanced 3 diagnoses × 2 skin types set
    from dermkohya.generate import generate

    (root / "plans").mkdir()
    plan = (REPO / "plans" / "demo-ti.toml").read_text()
    (root / "plans" / "demo-ti.toml").write_text(plan.replace('["I", "III", "V", "VI"]', '["I", "VI"]').replace("count = 12", "count = 6"))
    monkeypatch.chdir(root)
    made = generate(Path("plans/demo-ti.toml"), show_progress=False)
    rows = (root / "synthetic" / "demo-ti" / "index.csv").read_text().splitlines()[1:]
    assert len(rows) == 6 and all(any(f"<{d}>" in row for d in ("erythema-patch", "pustule-like-dots", "scaly-plaque")) for row in rows), made
    plan_json = json.loads((root / "synthetic" / "demo-ti" / "plan.json").read_text())
    assert len(plan_json["fingerprint"]["embeddings"]) == 1
    shutil.rmtree(root / "models" / "derived")  # GBs of hard links and a text encoder: not kept after the test
