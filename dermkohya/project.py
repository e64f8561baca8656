"""A dermkohya project: the user's own folder and git repository, marked by `dermkohya.toml`.

dermkohya is an installed package; the files it reads and writes (run files, datasets, outputs) belong
to a project. The project root is the nearest folder holding `dermkohya.toml` — searched upward from
the file a command is given, then from the working folder — never the package's own location, so a
wheel in site-packages and a source checkout behave alike. `dermkohya init` scaffolds one.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from dermkohya.errors import DermkohyaError
from dermkohya.files import write_atomic
from dermkohya.paths import TEMPLATES_DIR
from dermkohya.schema import load_toml_model

MARKER = "dermkohya.toml"
# Where the package's kohya-side files are copied for kohya's PYTHONPATH when the project does not
# contain the package itself (git-ignored local state, rewritten by every render that needs it).
KOHYA_IMPORT_DIR = ".dermkohya/kohya-path"
SCAFFOLD_DIR = TEMPLATES_DIR / "project"
# The scaffold's folders; each gets a .gitkeep so git keeps it while it is empty.
SCAFFOLD_FOLDERS = ("runs", "datasets", "plans", "sweeps")


class KohyaSettings(BaseModel):
    """Where kohya lives for this project; SD_SCRIPTS_DIR / KOHYA_PYTHON override either for one shell."""

    model_config = ConfigDict(extra="forbid")
    sd_scripts: str = "vendor/sd-scripts"
    python: str = ".venv-kohya/bin/python"


class ProjectSettings(BaseModel):
    """dermkohya.toml. Relative paths start at the project root (the file's folder)."""

    model_config = ConfigDict(extra="forbid")
    format: int = 1
    kohya: KohyaSettings = KohyaSettings()


def find_root(*starts: Path) -> Path | None:
    """The nearest folder at or above one of `starts` (tried in order, then the working folder) holding dermkohya.toml."""
    for start in (*starts, Path.cwd()):
        start = Path(os.path.abspath(start))
        if not start.is_dir():
            start = start.parent  # a run file, plan or recipe: its folder
        for folder in (start, *start.parents):
            if (folder / MARKER).is_file():
                return folder
    return None


def resolve_root(explicit: Path | None = None, *starts: Path) -> Path:
    """The project root a command works in: `--project`, else the nearest marker, else the working folder.

    The last fallback keeps a plain folder of run files usable; `dermkohya init` makes it a project.
    """
    if explicit is not None:
        root = Path(os.path.abspath(explicit))
        if not (root / MARKER).is_file():
            raise DermkohyaError(
                f"--project {explicit}: no {MARKER} there, so it is not a dermkohya project: "
                f"`dermkohya init {explicit}` makes it one, or pass the folder that holds {MARKER}"
            )
        return root
    return find_root(*starts) or Path.cwd().resolve()


def load_settings(root: Path) -> ProjectSettings:
    """The project's dermkohya.toml, or the defaults where the folder has none."""
    path = root / MARKER
    if not path.is_file():
        return ProjectSettings()
    return load_toml_model(path, ProjectSettings, what="project file", example=f"{SCAFFOLD_DIR / MARKER}")


def kohya_paths(root: Path | None = None) -> tuple[Path, Path]:
    """sd-scripts and kohya's Python as the project's dermkohya.toml places them (environment not consulted).

    A folder that is not itself in a project takes the settings of the project around the working
    folder, so a scratch folder of run files still finds the kohya of the project one works in.
    """
    start = root if root is not None else Path.cwd()
    base = find_root(start) or Path(os.path.abspath(start))
    settings = load_settings(base).kohya
    return base / settings.sd_scripts, base / settings.python


# --- kohya imports dermkohya's network modules -------------------------------------------------------

def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def kohya_import_dir(root: Path) -> Path:
    """The folder kohya's PYTHONPATH gets so that `--network_module dermkohya.networks.…` imports.

    The project root itself where the running package lies in it (the dermkohya source checkout);
    otherwise the project's .dermkohya/kohya-path, which holds only the package's kohya-side files.
    Never the site-packages folder dermkohya is installed in: that would put dermkohya's torch,
    diffusers and the rest in front of kohya's.
    """
    root = Path(os.path.abspath(root))
    if _package_dir().parent == root.resolve():
        return root
    return root / KOHYA_IMPORT_DIR


def kohya_side_files() -> dict[str, bytes]:
    """What kohya imports of dermkohya: the package's __init__ and networks/ (stdlib, torch, sd-scripts and the
    accelerate and safetensors sd-scripts' requirements pin only)."""
    package = _package_dir()
    files = {"dermkohya/__init__.py": (package / "__init__.py").read_bytes()}
    for path in sorted((package / "networks").rglob("*.py")):
        files[f"dermkohya/{path.relative_to(package).as_posix()}"] = path.read_bytes()
    return files


def ensure_kohya_import_dir(root: Path) -> Path:
    """Write (or refresh) the copy kohya imports from; a no-op in the source checkout.

    A copy, not a link: the network code a run used stays beside it until the next render, so
    `train_command.sh` re-run by hand trains with the same code after an upgrade of the package.
    """
    target = kohya_import_dir(root)
    if target == Path(os.path.abspath(root)):
        return target
    wanted = kohya_side_files()
    for name, data in wanted.items():
        path = target / name
        if not path.is_file() or path.read_bytes() != data:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
    for path in (target / "dermkohya").rglob("*.py"):
        if path.relative_to(target).as_posix() not in wanted:
            path.unlink()  # a module the installed package no longer has
    return target


# --- dermkohya init ---------------------------------------------------------------------------------

def scaffold_files() -> dict[str, bytes]:
    """The files `init` writes, by their path in the project (templates/project/, `gitignore` → `.gitignore`)."""
    from dermkohya import kohya, templating  # kohya imports this module

    env = templating.file_environment()
    context = {"pinned_commit": kohya.PINNED_COMMIT, "marker": MARKER}
    files: dict[str, bytes] = {}
    for path in sorted(p for p in SCAFFOLD_DIR.rglob("*") if p.is_file()):
        name = path.relative_to(SCAFFOLD_DIR).as_posix()
        if name.endswith(".j2"):
            data = env.get_template(f"project/{name}").render(context).encode()
            name = name.removesuffix(".j2")
        else:
            data = path.read_bytes()
        files["." + name if name == "gitignore" else name] = data
    for folder in SCAFFOLD_FOLDERS:
        if not any(n.startswith(f"{folder}/") for n in files):
            files[f"{folder}/.gitkeep"] = b""
    return files


def init(directory: Path) -> list[Path]:
    """Scaffold a project in `directory`; returns the files written.

    An empty or new folder gets everything; an existing project gets only what it lacks; any other
    non-empty folder is refused, so no file of the user's is ever overwritten or mixed into.
    """
    directory = Path(os.path.abspath(directory))
    if directory.exists() and not directory.is_dir():
        raise DermkohyaError(f"{directory} is a file: give `dermkohya init` a new or empty folder")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / MARKER).is_file():
        raise DermkohyaError(
            f"{directory} is not empty and holds no {MARKER}: `dermkohya init` writes only into a new or empty "
            f"folder (or adds missing files to an existing project); choose another folder, or create {MARKER} "
            "there yourself to make it a project"
        )
    written: list[Path] = []
    for name, data in scaffold_files().items():
        path = directory / name
        if path.exists() or path.is_symlink():
            continue  # the project's own version wins, always
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
        written.append(path)
    return written

