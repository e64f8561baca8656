"""Rendering: golden files, TOML-safe values, deterministic bytes, launch arguments, refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from PIL import Image

from dermkohya import render
from dermkohya.errors import DermkohyaError, ProblemsError

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the dermkohya checkout, itself a project

GOLDEN = Path(__file__).parent / "golden"
RENDERED = ("config.toml", "dataset.toml", "sample_prompts.txt", "train_command.sh")


def _project(tmp_path: Path, run_text: str, *, run: str = "demo", folders: dict[str, int] | None = None) -> Path:
    """A project root with runs/<run>.toml and a small kohya folder (plus metadata.csv) at data/."""
    root = tmp_path / "project"
    (root / "runs").mkdir(parents=True)
    (root / "runs" / f"{run}.toml").write_text(run_text, encoding="utf-8")
    rows = ["image,diagnosis,fitzpatrick"]
    for folder, count in (folders or {"2_derm": 3}).items():
        (root / "data" / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (64, 64), (200, 120 + i, 110)).save(root / "data" / folder / f"img{i}.png")
            (root / "data" / folder / f"img{i}.txt").write_text(f"clinical dermatology photograph, plaque, Fitzpatrick skin type {'IV' if i else 'II'}")
            rows.append(f"{folder}/img{i}.png,plaque,{'IV' if i else 'II'}")
    (root / "data" / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


DEMO_RUN = """
[model]
base = "random:sd15"
[dataset]
train_data_dir = "data"
min_bucket_reso = 64
max_bucket_reso = 128
[train]
resolution = 64
epochs = 2
mixed_precision = "no"
[sample]
every_n_epochs = 1
steps = 4
"""


def _normalised(path: Path, root: Path) -> str:
    return path.read_text(encoding="utf-8").replace(str(root), "<root>").replace(str(PROJECT_ROOT), "<dermkohya>")


def test_golden_files(tmp_path: Path) -> None:
    root = _project(tmp_path, DEMO_RUN)
    rendered = render.render(Path("runs/demo.toml"), project_root=root, check_keys=False)
    update = os.environ.get("DERMKOHYA_UPDATE_GOLDEN") == "1"
    for name in RENDERED:
        text = _normalised(rendered.files[name], root)
        golden = GOLDEN / "demo" / name
        if update:
            golden.write_text(text, encoding="utf-8")
        assert text == golden.read_text(encoding="utf-8"), f"{name} differs from {golden} (DERMKOHYA_UPDATE_GOLDEN=1 to accept)"


def test_rendering_is_deterministic_and_touches_nothing_when_unchanged(tmp_path: Path) -> None:
    root = _project(tmp_path, DEMO_RUN)
    first = render.render(Path("runs/demo.toml"), project_root=root, check_keys=False)
    before = {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in first.files.items()}
    second = render.render(Path("runs/demo.toml"), project_root=root, check_keys=False)
    assert {name: (p.read_bytes(), p.stat().st_mtime_ns) for name, p in second.files.items()} == before


def test_config_matches_the_card_and_points_at_the_data(tmp_path: Path) -> None:
    root = _project(tmp_path, DEMO_RUN)
    rendered = render.render(Path("runs/demo.toml"), project_root=root, check_keys=False)
    config = tomllib.loads(rendered.files["config.toml"].read_text())
    flat = {k: v for section in config.values() for k, v in section.items()}
    assert flat["network_dim"] == 16 and flat["network_alpha"] == 16 and flat["learning_rate"] == 1e-4
    assert flat["train_batch_size"] == 4 and flat["max_train_epochs"] == 2 and flat["sdpa"] is True
    assert flat["gradient_checkpointing"] is False  # False is written, never dropped
    assert flat["console_log_simple"] is True  # same logging mode everywhere: same seed, same weights
    assert flat["tokenizer_cache_dir"] == "models/tokenizers"
    data = tomllib.loads(rendered.files["dataset.toml"].read_text())
    assert data["general"]["caption_extension"] == ".txt"
    assert data["datasets"][0]["subsets"] == [{"image_dir": "data/2_derm", "num_repeats": 2, "class_tokens": "derm"}]
    prompts = [l for l in rendered.files["sample_prompts.txt"].read_text().splitlines() if l and not l.startswith("#")]
    assert len(prompts) == 6 and "plaque, Fitzpatrick skin type VI" in prompts[-1]  # 1 diagnosis × 6 types


def test_quotes_spaces_and_unicode_cannot_break_the_toml(tmp_path: Path) -> None:
    nasty = 'a "quoted" \\ path ü\nwith = injection'
    run = DEMO_RUN.replace("[sample]", f"[sample]\nprompts = [{toml_string(nasty.replace(chr(10), ' '))}]") + (
        "\n[kohya]\nlog_prefix = " + toml_string(nasty) + "\n"
    )
    root = _project(tmp_path, run)
    (root / "data").rename(root / 'my "data" ü')
    (root / "runs" / "demo.toml").write_text(run.replace('train_data_dir = "data"', "train_data_dir = " + toml_string('my "data" ü')))
    rendered = render.render(Path("runs/demo.toml"), project_root=root, check_keys=False)
    config = tomllib.loads(rendered.files["config.toml"].read_text())
    assert config["kohya"]["log_prefix"] == nasty
    data = tomllib.loads(rendered.files["dataset.toml"].read_text())
    assert data["datasets"][0]["subsets"][0]["image_dir"] == 'my "data" ü/2_derm'


def toml_string(value: str) -> str:
    return render.toml_value(value)


def test_train_command_is_shell_quoted(tmp_path: Path) -> None:
    root = _project(tmp_path, DEMO_RUN.replace("[model]", '[launch]\nextra_args = ["--main_process_port", "29 500"]\n[model]'))
    rendered = render.render(Path("runs/demo.toml"), project_root=root, check_keys=False)
    script = rendered.files["train_command.sh"].read_text()
    assert "'29 500'" in script
    assert os.access(rendered.files["train_command.sh"], os.X_OK)
    assert subprocess.run(["bash", "-n", str(rendered.files["train_command.sh"])]).returncode == 0


def test_multi_gpu_and_multi_node_launch_arguments(tmp_path: Path) -> None:
    root = _project(tmp_path, DEMO_RUN + '\n[launch]\nprocesses = 2\nmachines = 2\nmachine_rank = 1\nmain_process_ip = "10.0.0.1"\nmain_process_port = 29500\ngpu_ids = "0,1"\n')
    args = render.render(Path("runs/demo.toml"), project_root=root, check_keys=False).launch_args
    joined = " ".join(args)
    assert "--multi_gpu" in args and "--num_processes 4 --num_machines 2" in joined
    assert "--machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29500" in joined
    assert "--gpu_ids 0,1" in joined
    single = _project(tmp_path / "single", DEMO_RUN)
    assert "--multi_gpu" not in render.render(Path("runs/demo.toml"), project_root=single, check_keys=False).launch_args


def test_kohya_section_may_not_override_rendered_keys(tmp_path: Path) -> None:
    root = _project(tmp_path, DEMO_RUN + "\n[kohya]\nnetwork_dim = 32\n")
    with pytest.raises(DermkohyaError, match="network_dim"):
        render.render(Path("runs/demo.toml"), project_root=root, check_keys=False)


def test_disk_latent_cache_never_writes_into_source_images(tmp_path: Path) -> None:
    root = _project(tmp_path, DEMO_RUN.replace("epochs = 2", "epochs = 2\ncache_latents_to_disk = true"))
    with pytest.raises(DermkohyaError, match="npz"):
        render.render(Path("runs/demo.toml"), project_root=root, check_keys=False)


def test_missing_dataset_names_the_fix(tmp_path: Path) -> None:
    root = _project(tmp_path, DEMO_RUN)
    shutil.rmtree(root / "data")
    with pytest.raises(DermkohyaError, match="dataset folder .* not found"):
        render.render(Path("runs/demo.toml"), project_root=root, check_keys=False)


def test_prompts_that_kohya_would_read_as_options_are_refused(tmp_path: Path) -> None:
    root = _project(tmp_path, DEMO_RUN.replace("[sample]", '[sample]\nprompts = ["a lesion --n bad"]'))
    with pytest.raises(DermkohyaError, match="--"):
        render.render(Path("runs/demo.toml"), project_root=root, check_keys=False)


@pytest.mark.kohya
@pytest.mark.parametrize("run", ["derm-sd15", "derm-sdxl", "demo"])
def test_shipped_runs_render_keys_sd_scripts_accepts(tmp_path: Path, run: str) -> None:
    """Every rendered key is an option of the script's own argparse parser (kohya accepts unknown ones silently)."""
    text = (PROJECT_ROOT / "runs" / f"{run}.toml").read_text()
    root = _project(tmp_path, text.replace('"datasets/demo/data"', '"data"'), run=run)
    rendered = render.render(Path(f"runs/{run}.toml"), project_root=root, check_keys=True)
    assert not any("not checked" in w for w in rendered.warnings)
    assert rendered.spec.script == ("sdxl_train_network.py" if run == "derm-sdxl" else "train_network.py")


@pytest.mark.kohya
def test_unknown_passthrough_key_is_refused_with_a_suggestion(tmp_path: Path) -> None:
    root = _project(tmp_path, DEMO_RUN + "\n[kohya]\nnoise_ofset_random_strength = true\n")
    with pytest.raises(ProblemsError) as caught:
        render.render(Path("runs/demo.toml"), project_root=root, check_keys=True)
    assert "did you mean `noise_offset_random_strength`" in caught.value.problems[0]


def test_a_prepared_dataset_renders_its_subsets_counts_and_template(tmp_path: Path) -> None:
    from dermkohya import demo, prepare

    root = tmp_path / "project"
    recipe = root / "datasets" / "demo" / "dataset.toml"
    recipe.parent.mkdir(parents=True)
    recipe.write_text((PROJECT_ROOT / "datasets" / "demo" / "dataset.toml").read_text())
    demo.make_demo_dataset(recipe.parent / "source", size=64, per_cell=4)
    record = prepare.prepare(recipe)
    (root / "runs").mkdir()
    (root / "runs" / "prep.toml").write_text(DEMO_RUN.replace('train_data_dir = "data"', 'prepared = "datasets/demo"'))
    rendered = render.render(Path("runs/prep.toml"), project_root=root, check_keys=False)
    subsets = tomllib.loads(rendered.files["dataset.toml"].read_text())["datasets"][0]["subsets"]
    assert len(subsets) == len(record.subsets) == 18
    assert all(s["image_dir"].startswith("datasets/demo/prepared/train/") for s in subsets)
    assert rendered.manifest["dataset"]["content_hash"] == record.content_hash
    assert rendered.manifest["dataset"]["caption_template"] == record.caption_template
    assert rendered.manifest["dataset"]["counts"] == record.counts_before  # images; repeats apart (#11.6)
    assert rendered.manifest["dataset"]["effective_counts"] == record.counts_after
    assert rendered.manifest["dataset"]["images"] == record.split.train_images
    assert rendered.manifest["dataset"]["effective_samples"] == record.effective_samples
