"""adopt: real kohya_ss presets, sd-scripts' documented examples and command lines → run files that render.

The round trip (marked `kohya`) parses the original command line and the adopted run's rendered files
with sd-scripts' own parser (tests/kohya_parse.py) and requires the same values, except paths and the
differences adopt itself lists.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from dermkohya import adopt, kohya, render
from dermkohya.adopt import gui
from dermkohya.adopt.runfile import DATASET_AS_ARGS, KOHYA_DEFAULTS
from dermkohya.cli import main
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.spec import load_run

PRESETS = Path(__file__).parent / "data" / "kohya_ss_presets"
PRESET_FILES = sorted(PRESETS.glob("*.json"))
DOCS = Path(__file__).resolve().parents[1] / "vendor" / "sd-scripts" / "docs"
UNKNOWN_KEY = "not a kohya_ss LoRA-tab key dermkohya knows"


def _project(tmp_path: Path) -> Path:
    """A project with a two-image kohya folder at data/2_derm (captions in .txt)."""
    root = tmp_path / "project"
    (root / "data" / "2_derm").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (200, 120 + i, 110)).save(root / "data" / "2_derm" / f"img{i}.png")
        (root / "data" / "2_derm" / f"img{i}.txt").write_text("clinical dermatology photograph, plaque")
    return root


def _adopt(root: Path, source: Path | None, name: str = "adopted", **options) -> tuple[Path, adopt.Adopted]:
    return adopt.adopt(source, name, project_root=root, **options)


def _doc_block(doc: str, fence: str, contains: str) -> str:
    """The first ```fence block of an sd-scripts doc that contains `contains` (the docs are read, never copied)."""
    path = DOCS / doc
    if not path.is_file():
        pytest.skip(f"{path} missing: vendor/sd-scripts is not checked out")
    blocks = re.findall(rf"^```{fence}\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S)
    return next(b for b in blocks if contains in b)


# --- kohya_ss GUI presets ------------------------------------------------------------------------

def test_presets_cover_the_families_the_issue_names() -> None:
    presets = {p.name: json.loads(p.read_text()) for p in PRESET_FILES}
    types = {d["LoRA_type"] for d in presets.values()}
    assert {"Standard", "LyCORIS/LoCon", "LyCORIS/LoHa", "LyCORIS/LoKr", "LyCORIS/iA3"} <= types
    assert {bool(d.get("sdxl")) for d in presets.values()} == {True, False}
    assert {"Prodigy", "DAdaptAdam"} <= {d["optimizer"] for d in presets.values()}
    assert "45088f04af78e11cec5407ff4652ea3ed2c14422" in (PRESETS / "README.md").read_text()


@pytest.mark.parametrize("preset", PRESET_FILES, ids=lambda p: p.stem)
def test_every_gui_key_is_converted_or_dropped_with_a_reason(tmp_path: Path, preset: Path) -> None:
    root = _project(tmp_path)
    path, adopted = _adopt(root, preset)
    gui_keys = set(json.loads(preset.read_text()))
    accounted = {n.key for n in adopted.notes if n.kind in ("converted", "dropped")}
    assert gui_keys <= accounted, f"keys with no account: {sorted(gui_keys - accounted)}"
    assert not [n.key for n in adopted.notes if UNKNOWN_KEY in n.text]
    assert all(n.text.strip() for n in adopted.notes)
    text = path.read_text()
    for key in gui_keys:  # the file itself carries the account, key by key
        assert re.search(rf"^#   {re.escape(key)}: ", text, re.M), key


@pytest.mark.parametrize("preset", PRESET_FILES, ids=lambda p: p.stem)
def test_adopted_presets_refuse_only_the_todo_paths_then_render(tmp_path: Path, preset: Path) -> None:
    root = _project(tmp_path)
    path, adopted = _adopt(root, preset, name="todo")
    assert adopted.todo == ["[model] base", "[dataset] train_data_dir"]
    with pytest.raises(ProblemsError) as refused:
        render.render(path, project_root=root, check_keys=False)
    assert len(refused.value.problems) == 2
    assert "[model] base" in refused.value.problems[0] and "TODO" in refused.value.problems[0]
    assert "[dataset] train_data_dir" in refused.value.problems[1]

    family = "sdxl" if json.loads(preset.read_text()).get("sdxl") else "sd15"
    path, adopted = _adopt(root, preset, name="ready", base=f"random:{family}", train_data_dir="data")
    assert not adopted.todo
    rendered = render.render(path, project_root=root, check_keys=False)
    assert rendered.spec.model.family == family
    config = tomllib.loads(rendered.files["config.toml"].read_text())
    assert config["saving"]["output_name"] == "ready"


def test_sd15_standard_preset_strings_become_numbers(tmp_path: Path) -> None:
    root = _project(tmp_path)
    path, adopted = _adopt(root, PRESETS / "sd15 - EDG_LoraOptiSettings.json", base="random:sd15", train_data_dir="data")
    spec, _ = load_run(path)
    assert spec.train.learning_rate == 1e-4 and spec.train.unet_lr == 1e-4 and spec.train.text_encoder_lr == 5e-5
    assert spec.train.seed == 1234 and spec.train.noise_offset == 0.05 and spec.train.batch_size == 3
    assert spec.train.epochs == 1 and spec.train.optimizer == "AdamW8bit" and spec.train.clip_skip == 2
    assert spec.network.module == "networks.lora" and spec.network.dim == 64 and spec.network.alpha == 64
    assert spec.train.attention == "mem_eff_attn"  # both it and xformers are on: kohya uses mem_eff_attn first
    assert spec.train.resolution == 650 and any(n.key == "resolution" and n.kind == "needs you" for n in adopted.notes)
    assert spec.dataset.enable_bucket is False
    assert re.search(r'^# Converted:\n(#   .*\n)*#   max_resolution: → resolution$', path.read_text(), re.M)


def test_sdxl_preset_with_steps_a_dead_caption_extension_and_no_half_vae(tmp_path: Path) -> None:
    root = _project(tmp_path)
    path, adopted = _adopt(root, PRESETS / "SDXL - LoRA AI_Now ADamW v1.0.json", base="random:sdxl", train_data_dir="data")
    spec, _ = load_run(path)
    assert spec.model.family == "sdxl" and spec.script == "sdxl_train_network.py" and spec.model.no_half_vae is True
    assert spec.train.max_steps == 320 and spec.train.epochs is None  # the GUI's max_train_steps wins over epoch
    assert spec.train.attention == "xformers" and spec.train.min_snr_gamma == 5
    assert spec.train.cache_latents_to_disk is False  # would write .npz files into the user's images
    caption = next(n for n in adopted.notes if n.key == "caption_extension" and n.kind == "needs you")
    assert "'.txt-no'" in caption.text and "0 found" in caption.text
    raw = tomllib.loads(path.read_text())
    assert raw["kohya"]["max_timestep"] == 900 and raw["kohya"]["adaptive_noise_scale"] == 0.00375
    assert raw["kohya"]["training_comment"] == "trigger: lxndrn woman"


@pytest.mark.parametrize(("preset", "algo"), [("sd15 - EDG_LoConOptiSettings.json", "locon"), ("loha-sd15.json", "loha"),
                                              ("SDXL - LoKR v1.0.json", "lokr"), ("ia3-sd15.json", "ia3")])
def test_lycoris_presets_need_the_lycoris_module(tmp_path: Path, preset: str, algo: str) -> None:
    root = _project(tmp_path)
    path, adopted = _adopt(root, PRESETS / preset)
    spec_raw = tomllib.loads(path.read_text())
    assert spec_raw["network"]["module"] == "lycoris.kohya"
    assert f"algo={algo}" in spec_raw["network"]["args"] and any(a.startswith("conv_dim=") for a in spec_raw["network"]["args"])
    from dermkohya.adopt.runfile import _installed

    notes = [n for n in adopted.notes if n.key == "network_module"]
    if _installed("lycoris") is not True:  # the user is told to install it into kohya's environment
        assert notes and notes[0].kind == "needs you" and "`lycoris-lora`" in notes[0].text


def test_adaptive_optimizer_warmup_percent_and_additional_parameters(tmp_path: Path) -> None:
    root = _project(tmp_path)
    path, adopted = _adopt(root, PRESETS / "SDXL - LoRA kudou-reira dadaptadam v1.1.json", base="random:sdxl", train_data_dir="data")
    spec, _ = load_run(path)
    assert spec.train.optimizer == "DAdaptAdam" and spec.train.optimizer_args == ["decouple=True", "weight_decay=0.1", "betas=0.9,0.91"]
    assert spec.train.lr_warmup_steps == 0.05  # the GUI's 5 % → kohya's fraction of all steps
    assert spec.network.train_unet_only is True  # from additional_parameters
    path, _ = _adopt(root, PRESETS / "SDXL - LoRA kudou-reira prodigy v4.0.json", name="prodigy")
    raw = tomllib.loads(path.read_text())
    assert raw["kohya"]["lr_scheduler_type"] == "CosineAnnealingLR" and raw["kohya"]["lr_scheduler_args"] == ["T_max=30"]
    assert raw["train"]["optimizer"] == "Prodigy" and raw["network"]["train_unet_only"] is True


def test_gui_toml_is_read_like_its_json(tmp_path: Path) -> None:
    import tomli_w

    root = _project(tmp_path)
    data = json.loads((PRESETS / "loha-sd15.json").read_text())
    (tmp_path / "gui.toml").write_text(tomli_w.dumps(data))
    from_toml, _ = _adopt(root, tmp_path / "gui.toml", name="from-toml")
    from_json, _ = _adopt(root, PRESETS / "loha-sd15.json", name="from-json")
    assert from_toml.read_text().replace("from-toml", "NAME").replace(str(tmp_path / "gui.toml"), "SOURCE").replace("gui.toml", "SOURCE") == \
        from_json.read_text().replace("from-json", "NAME").replace(str(PRESETS / "loha-sd15.json"), "SOURCE").replace("loha-sd15.json", "SOURCE")


def test_other_model_families_are_refused(tmp_path: Path) -> None:
    (tmp_path / "flux.json").write_text(json.dumps({"LoRA_type": "Flux1", "flux1_checkbox": True}))
    with pytest.raises(DermkohyaError, match="flux1_checkbox"):
        _adopt(_project(tmp_path), tmp_path / "flux.json")


# --- sd-scripts configs and command lines ---------------------------------------------------------

def test_documented_command_and_dataset_config(tmp_path: Path) -> None:
    root = _project(tmp_path)
    (tmp_path / "train.sh").write_text(_doc_block("train_network.md", "bash", "train_network.py"))
    (tmp_path / "my_dataset_config.toml").write_text(_doc_block("config_README-en.md", "toml", "[general]"))
    path, adopted = _adopt(root, tmp_path / "train.sh", base="random:sd15", train_data_dir="data")
    spec, _ = load_run(path)
    assert spec.network.dim == 16 and spec.network.alpha == 1 and spec.train.learning_rate == 1e-4
    assert spec.train.optimizer == "AdamW8bit" and spec.train.epochs == 10 and spec.train.gradient_checkpointing is True
    assert spec.train.attention == "sdpa" and spec.launch.cpu_threads_per_process == 1
    assert spec.train.batch_size == 4 and spec.dataset.shuffle_caption is True and spec.dataset.keep_tokens == 2
    needs = {n.key for n in adopted.notes if n.kind == "needs you"}
    assert {"[[datasets]]", "subset 3 is_reg"} <= needs  # the reg subset and the fine-tuning dataset have no place
    assert "output_name" in adopted.differences and "seed" in adopted.differences
    render.render(path, project_root=root, check_keys=False)


def test_sd_scripts_config_file_and_inline_command(tmp_path: Path) -> None:
    root = _project(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text('[model]\npretrained_model_name_or_path = "model.safetensors"\n[training]\n'
                      'network_module = "networks.lora"\nnetwork_dim = 8\nlearning_rate = 3e-4\nmax_train_steps = 50\n'
                      'caption_extension = ".caption"\nxformers = true\n')
    path, adopted = _adopt(root, config, name="cfg", family="sdxl", train_data_dir="data")
    spec, _ = load_run(path)
    assert spec.model.family == "sdxl" and spec.model.base == "model.safetensors"
    assert spec.train.max_steps == 50 and spec.train.epochs is None and spec.train.attention == "xformers"
    assert any(n.key == "caption_extension" and n.kind == "needs you" for n in adopted.notes)
    command = (f"accelerate launch --num_processes 2 --gpu_ids 0,1 train_network.py --config_file {config} "
               "--network_dim 32 --lr_warmup_steps 10% --network_args conv_dim=4 conv_alpha=1 --save_state")
    path, adopted = _adopt(root, None, name="inline", command=command)
    spec, _ = load_run(path) if not adopted.todo else (None, None)
    raw = tomllib.loads(path.read_text())
    assert raw["network"]["dim"] == 32 and raw["train"]["lr_warmup_steps"] == 0.1  # the command line wins over the config
    assert raw["network"]["args"] == ["conv_dim=4", "conv_alpha=1"] and raw["train"]["save_state"] is True
    assert raw["launch"]["processes"] == 2 and raw["launch"]["gpu_ids"] == "0,1"
    assert adopted.todo == ["[dataset] train_data_dir"]


def test_never_overwrites_a_run_file(tmp_path: Path) -> None:
    root = _project(tmp_path)
    (root / "runs").mkdir()
    (root / "runs" / "mine.toml").write_text("# mine\n")
    with pytest.raises(DermkohyaError, match=r"runs/mine\.toml already exists.*--name"):
        _adopt(root, PRESETS / "loha-sd15.json", name="mine")
    assert (root / "runs" / "mine.toml").read_text() == "# mine\n"


def test_paths_typed_in_a_subfolder_are_written_relative_to_the_project_root(tmp_path: Path) -> None:
    root = _project(tmp_path)
    (root / "runs").mkdir()
    path, _ = _adopt(root, PRESETS / "loha-sd15.json", base="../models/base.safetensors", train_data_dir="../data", cwd=root / "runs")
    raw = tomllib.loads(path.read_text())
    assert raw["model"]["base"] == "models/base.safetensors" and raw["dataset"]["train_data_dir"] == "data"


def test_a_command_without_a_training_script_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DermkohyaError, match="train_network.py"):
        _adopt(_project(tmp_path), None, command="accelerate launch fine_tune.py --learning_rate 1e-5")


def test_cli_writes_the_run_file_and_lists_what_needs_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _project(tmp_path)
    monkeypatch.chdir(root)
    result = CliRunner().invoke(main, ["adopt", str(PRESETS / "ia3-sd15.json"), "--name", "ia3", "--train-data-dir", "data"])
    assert result.exit_code == 0, result.output
    assert (root / "runs" / "ia3.toml").is_file() and "needs you" in result.output and "[model] base" in result.output
    again = CliRunner().invoke(main, ["adopt", str(PRESETS / "ia3-sd15.json"), "--name", "ia3"])
    assert again.exit_code == 1 and "already exists" in again.output


# --- round trip through kohya's own parser ---------------------------------------------------------

def _kohya_parse(script: str, argvs: list[list[str]]) -> list[dict]:
    """sd-scripts' parser (setup_parser + read_config_from_file) on each argv, in one kohya process."""
    helper = Path(__file__).with_name("kohya_parse.py")
    out = subprocess.run([str(kohya.find_python()), str(helper), script], input=json.dumps(argvs), cwd=kohya.find_sd_scripts(),
                         env=kohya.kohya_env(), capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("DERMKOHYA-PARSED ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("DERMKOHYA-PARSED "))


def _script_argv(command: str) -> tuple[str, list[str]]:
    from dermkohya.adopt.source import split_words

    words = split_words(command, "test")
    at = next(i for i, w in enumerate(words) if w.endswith("train_network.py"))
    return Path(words[at]).name, words[at + 1:]


def _round_trip_cases(tmp_path: Path) -> list[tuple[str, Path, str, list[str]]]:
    """(name, source file, script, the script's original argv): sd-scripts' documented examples, a command
    line with many options over a --config_file, and an sd-scripts config alone (as --output_config writes one)."""
    cases = []
    commands = [(doc.removesuffix(".md"), _doc_block(doc, "bash", contains))
                for doc, contains in (("train_network.md", "train_network.py"), ("validation.md", "sdxl_train_network.py \\"))]
    commands.append(("many", "accelerate launch --num_cpu_threads_per_process 4 train_network.py --config_file base.toml "
                     "--pretrained_model_name_or_path m.safetensors --train_data_dir img --output_dir out --network_module networks.lora "
                     "--network_alpha 4 --learning_rate 5e-5 --unet_lr 1e-4 --text_encoder_lr 2e-5 --optimizer_type AdamW "
                     "--optimizer_args weight_decay=0.01 betas=0.9,0.99 --lr_scheduler cosine_with_restarts --lr_scheduler_num_cycles 3 "
                     "--lr_warmup_steps 5% --resolution 768 --train_batch_size 2 --max_train_steps 300 --mixed_precision bf16 "
                     "--save_precision fp16 --seed 7 --xformers --cache_latents --clip_skip 2 --caption_extension .txt --enable_bucket "
                     "--min_bucket_reso 320 --max_bucket_reso 1280 --shuffle_caption --keep_tokens 1 --color_aug "
                     "--caption_dropout_rate 0.1 --max_data_loader_n_workers 1 --save_every_n_epochs 2 --network_dropout 0.1"))
    for name, command in commands:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cmd.sh").write_text(command)
        (folder / "my_dataset_config.toml").write_text(_doc_block("config_README-en.md", "toml", "[general]"))
        (folder / "dataset_config.toml").write_text(_doc_block("validation.md", "toml", "validation_split"))
        (folder / "base.toml").write_text('[a]\nnetwork_dim = 8\nmin_snr_gamma = 5.0\nnoise_offset = 0.05\n[b]\nmax_grad_norm = 0.5\n'
                                          'network_args = ["conv_dim=4", "conv_alpha=2"]\n')
        script, argv = _script_argv(command)
        argv = [str(folder / w) if i and argv[i - 1] == "--config_file" else w for i, w in enumerate(argv)]
        cases.append((name.replace("_", "-"), folder / "cmd.sh", script, argv))
    config = tmp_path / "config.toml"
    config.write_text('pretrained_model_name_or_path = "sd15.safetensors"\nnetwork_module = "networks.lora"\nnetwork_dim = 32\n'
                      'network_alpha = 16.0\nlearning_rate = 0.0002\ntext_encoder_lr = [5e-05]\nmax_train_epochs = 4\n'
                      'train_batch_size = 3\nresolution = "640,640"\nmixed_precision = "bf16"\nsdpa = true\nseed = 3\n'
                      'lr_warmup_steps = 0.1\nlr_scheduler = "cosine"\nmax_token_length = 150\nscale_weight_norms = 1.0\n')
    cases.append(("config", config, "train_network.py", ["--config_file", str(config)]))
    return cases


@pytest.mark.kohya
def test_round_trip_through_kohyas_parser(tmp_path: Path) -> None:
    root = _project(tmp_path)
    by_script: dict[str, list[tuple[str, list[str], list[str], adopt.Adopted]]] = {}
    for name, source, script, original in _round_trip_cases(tmp_path):
        family = "sdxl" if script.startswith("sdxl") else "sd15"
        path, adopted = _adopt(root, source, name=name, base=f"random:{family}", train_data_dir="data", family=family)
        rendered = render.render(path, project_root=root)  # check_keys: every [kohya] key is an option of kohya's parser
        ours = ["--config_file", str(rendered.files["config.toml"]), "--dataset_config", str(rendered.out_dir / "dataset.toml")]
        by_script.setdefault(script, []).append((name, original, ours, adopted))
    for script, cases in by_script.items():
        parsed = _kohya_parse(script, [argv for _, original, ours, _ in cases for argv in (original, ours)] + [[]])
        defaults = parsed.pop()  # adopt's tables of kohya's names and defaults hold for this sd-scripts
        assert {k: defaults[k] for k in KOHYA_DEFAULTS} == KOHYA_DEFAULTS
        assert gui.SAME | DATASET_AS_ARGS <= defaults.keys()
        for i, (name, _, _, adopted) in enumerate(cases):
            before, after = parsed[2 * i], parsed[2 * i + 1]
            skip = adopt.PATH_KEYS | set(adopted.differences)
            changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
                       if k not in skip and before.get(k) != after.get(k)}
            assert not changed, f"{name}: values that differ and adopt does not list: {changed}"
            listed_but_equal = [k for k in adopted.differences if before.get(k) == after.get(k)]
            assert not listed_but_equal, f"{name}: adopt lists differences kohya does not see: {listed_but_equal}"
            assert {"output_name", "console_log_simple"} <= adopted.differences.keys(), name


@pytest.mark.kohya
def test_adopted_presets_pass_kohyas_option_check_and_a_misspelt_option_is_refused(tmp_path: Path) -> None:
    root = _project(tmp_path)
    for i, preset in enumerate(PRESET_FILES):
        family = "sdxl" if json.loads(preset.read_text()).get("sdxl") else "sd15"
        path, _ = _adopt(root, preset, name=f"preset{i}", base=f"random:{family}", train_data_dir="data")
        render.render(path, project_root=root)  # every [kohya] key is an option of the family's script
    # sd-scripts' own SDXL example passes --text_encoder_lr1, which its parser does not have: render names it
    command = _doc_block("sdxl_train_network.md", "bash", "sdxl_train_network.py")
    path, _ = _adopt(root, None, name="sdxl-doc", command=command, base="random:sdxl", train_data_dir="data")
    with pytest.raises(ProblemsError, match="text_encoder_lr1.*did you mean `text_encoder_lr`"):
        render.render(path, project_root=root)
