"""A user's project: root discovery, dermkohya.toml, `dermkohya init`, the wheel, and kohya importing
dermkohya's network modules from a project that does not contain the package."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from dermkohya import kohya, project, render
from dermkohya.cli import main
from dermkohya.demo import make_demo_dataset
from dermkohya.errors import DermkohyaError, ProblemsError

REPO = Path(__file__).resolve().parents[1]


def _fast_run(root: Path) -> Path:
    """The demo run with dermkohya's own network module."""
    run = root / "runs" / "fast.toml"
    text = (root / "runs" / "demo.toml").read_text()
    run.write_text(text.replace("[network]\n", '[network]\nmodule = "dermkohya.networks.lora_fast"\n', 1))
    return run


def _project(tmp_path: Path, name: str = "proj") -> Path:
    root = tmp_path / name
    project.init(root)
    make_demo_dataset(root / "datasets" / "demo" / "data", per_cell=1, size=64)
    return root


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_init_scaffolds_a_project_and_never_overwrites(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    written = {p.relative_to(root).as_posix() for p in project.init(root)}
    shipped = ("runs/demo.toml", "runs/derm-sd15.toml", "runs/derm-sdxl.toml", "runs/derm-sdxl-24gb.toml", "sweeps/demo.toml")
    assert {"dermkohya.toml", "Makefile", ".gitignore", "README.md", "datasets/.gitkeep", "plans/.gitkeep", *shipped} == written
    for name in shipped:  # the repo's own files, shipped as package data
        assert (root / name).read_bytes() == (REPO / name).read_bytes()
    ignored = (root / ".gitignore").read_text().splitlines()
    assert {"models/", "output/", "artifacts/", "synthetic/", "reports/", ".dermkohya/", ".venv-kohya/"} <= set(ignored)
    assert kohya.PINNED_COMMIT in (root / "Makefile").read_text()
    assert project.load_settings(root) == project.ProjectSettings()

    (root / "runs" / "demo.toml").write_text("# mine\n")
    (root / "Makefile").unlink()
    assert project.init(root) == [root / "Makefile"]  # an existing project: only what it lacks
    assert (root / "runs" / "demo.toml").read_text() == "# mine\n"


def test_init_refuses_a_folder_of_someone_elses_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(DermkohyaError, match=r"not empty and holds no dermkohya.toml"):
        project.init(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_the_root_is_the_nearest_marker_from_the_run_file_then_the_working_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "proj"
    project.init(root)
    inner = root / "sub"
    inner.mkdir()
    (inner / project.MARKER).write_text("")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert project.find_root(root / "runs" / "demo.toml") == root
    assert project.find_root(inner / "runs" / "x.toml") == inner  # nearest, not outermost
    assert project.resolve_root(None, elsewhere / "r.toml") == elsewhere  # no project anywhere: the working folder
    monkeypatch.chdir(root / "runs")
    assert project.resolve_root(None, Path("nowhere.toml")) == root
    assert project.resolve_root(root) == root
    with pytest.raises(DermkohyaError, match=r"--project .*elsewhere: no dermkohya.toml.*dermkohya init"):
        project.resolve_root(elsewhere)


def test_the_repository_is_a_project_and_kohya_imports_from_it_directly() -> None:
    assert project.find_root(REPO / "runs" / "demo.toml") == REPO
    assert project.kohya_paths(REPO) == (REPO / "vendor" / "sd-scripts", REPO / ".venv-kohya" / "bin" / "python")
    assert project.kohya_import_dir(REPO) == REPO  # the source checkout: no copy, PYTHONPATH=$PWD as before


def test_settings_place_kohya_and_a_misspelt_key_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SD_SCRIPTS_DIR", raising=False)
    monkeypatch.delenv("KOHYA_PYTHON", raising=False)
    (tmp_path / project.MARKER).write_text('[kohya]\nsd_scripts = "../kohya/sd-scripts"\npython = "/opt/k/bin/python"\n')
    with pytest.raises(DermkohyaError, match=r"kohya/sd-scripts has no train_network.py"):
        kohya.find_sd_scripts(tmp_path)
    with pytest.raises(DermkohyaError, match=r"/opt/k/bin/python"):
        kohya.find_python(tmp_path / "runs")
    (tmp_path / project.MARKER).write_text('[kohya]\nsd_script = "x"\n')
    with pytest.raises(ProblemsError) as err:
        project.load_settings(tmp_path)
    assert "did you mean `sd_scripts`" in err.value.problems[0]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_render_outside_the_checkout_gives_kohya_a_copy_of_only_the_kohya_side_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _project(tmp_path)
    _fast_run(root)
    monkeypatch.chdir(root)
    _invoke("render", "runs/fast.toml", "--no-kohya-check")
    script = (root / "runs" / "fast" / "train_command.sh").read_text()
    assert 'export PYTHONPATH="$PWD/.dermkohya/kohya-path${PYTHONPATH:+:$PYTHONPATH}"' in script
    copy = root / project.KOHYA_IMPORT_DIR
    names = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*.py"))
    assert names == sorted(project.kohya_side_files()) and "dermkohya/networks/lora_fast.py" in names
    # kohya's environment has stdlib, torch, sd-scripts (`networks`, `library`) and what sd-scripts' requirements.txt
    # pins for it that these files use (accelerate, safetensors), never dermkohya's own dependencies
    allowed = set(sys.stdlib_module_names) | {"torch", "networks", "library", "dermkohya", "__future__",
                                              "accelerate", "safetensors"}
    for path in copy.rglob("*.py"):
        assert _imports(path) <= allowed, f"{path.relative_to(copy)} imports {_imports(path) - allowed}"
    stale = copy / "dermkohya" / "networks" / "gone.py"
    stale.write_text("")
    (copy / "dermkohya" / "networks" / "lora_fast.py").write_text("# edited")
    render.render(Path("runs/fast.toml"), project_root=root, check_keys=False)
    assert not stale.exists()  # a module the package no longer has is not imported by the next run
    assert (copy / "dermkohya/networks/lora_fast.py").read_bytes() == project.kohya_side_files()["dermkohya/networks/lora_fast.py"]


def test_cli_finds_the_project_from_the_run_file_and_from_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    _invoke("render", "proj/runs/demo.toml", "--no-kohya-check")
    config = (root / "runs" / "demo" / "config.toml").read_text()
    assert 'output_dir = "output/demo"' in config  # paths relative to the project, not the working folder
    (root / "runs" / "demo" / "config.toml").unlink()
    _invoke("--project", "proj", "render", "runs/demo.toml", "--no-kohya-check")
    assert (root / "runs" / "demo" / "config.toml").read_text() == config
    result = CliRunner().invoke(main, ["--project", ".", "render", "proj/runs/demo.toml"])
    assert result.exit_code == 1 and "not a dermkohya project" in result.output


def _build_wheel(tmp_path: Path) -> Path:
    """The wheel, built offline from a clean copy of the sources (links followed, as a release build does)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "dermkohya", src / "dermkohya", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("dermkohya-*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_carries_templates_and_networks_and_renders_an_initialised_project(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {p.relative_to(REPO).as_posix() for p in (REPO / "dermkohya" / "templates").rglob("*") if p.is_file()}
    assert packaged <= names and "dermkohya/templates/train_command.sh.j2" in names
    assert {"dermkohya/networks/__init__.py", "dermkohya/networks/lora_fast.py"} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if k not in {"SD_SCRIPTS_DIR", "KOHYA_PYTHON"}}
    env["PYTHONPATH"] = str(site)
    cli = [sys.executable, "-c", "import sys, dermkohya.cli; print('FROM', dermkohya.cli.__file__, file=sys.stderr); dermkohya.cli.main()"]

    def dk(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*cli, *args], cwd=cwd, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"FROM {site}" in done.stderr  # the wheel's dermkohya, not the checkout's
        return done

    dk("init", "proj", cwd=tmp_path)
    root = tmp_path / "proj"
    dk("demo-data", "datasets/demo/data", "--per-cell", "1", "--size", "64", cwd=root)
    _fast_run(root)
    for run in ("demo", "fast"):
        dk("render", f"runs/{run}.toml", "--no-kohya-check", cwd=root)
        assert (root / "runs" / run / "config.toml").is_file() and (root / "runs" / run / "train_command.sh").is_file()
    copied = root / project.KOHYA_IMPORT_DIR / "dermkohya" / "networks" / "lora_fast.py"
    assert copied.read_bytes() == (site / "dermkohya" / "networks" / "lora_fast.py").read_bytes()


@pytest.mark.kohya
def test_kohya_imports_lora_fast_from_an_initialised_project_as_train_and_train_command_launch_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dermkohya train`'s route (kohya_env, from sd-scripts' folder) and train_command.sh's (its exports),
    each ending in kohya's Python importing the network module instead of launching accelerate."""
    monkeypatch.setenv("SD_SCRIPTS_DIR", str(kohya.find_sd_scripts(REPO)))  # the project uses this checkout's kohya
    monkeypatch.setenv("KOHYA_PYTHON", str(kohya.find_python(REPO)))
    root = _project(tmp_path)
    _fast_run(root)
    render.render(Path("runs/fast.toml"), project_root=root, check_keys=False)
    kohya.verify_network_module("dermkohya.networks.lora_fast", root)

    python, sd_scripts = kohya.find_python(root), kohya.find_sd_scripts(root)
    probe = tmp_path / "kohya-python"  # stands in for `python -m accelerate.commands.launch …`: imports, prints where from
    probe.write_text(f'#!/bin/sh\ncd "$SD_SCRIPTS_DIR" && exec "{python}" -c "import sys; sys.path.insert(0, \'.\'); '
                     f'import dermkohya.networks.lora_fast as m; print(\'IMPORTED\', m.__file__)"\n')
    probe.chmod(0o755)
    env = dict(os.environ, KOHYA_PYTHON=str(probe), SD_SCRIPTS_DIR=str(sd_scripts))
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", str(root / "runs" / "fast" / "train_command.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"IMPORTED {root / project.KOHYA_IMPORT_DIR / 'dermkohya' / 'networks' / 'lora_fast.py'}" in done.stdout
