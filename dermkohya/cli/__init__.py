"""The `dermkohya` command line. It parses and prints; the work lives in the module named for it.

This module holds the group, the error handling every command shares and the project lookup; the
commands live beside it by topic: `runs.py` (render, adopt, train and the queue, sweep, runs, collect,
inspect, merge, resize), `data.py` (init, prepare, base, check, demo-data), `synthetic.py` (generate,
utility, evaluate, serve). Output formatting for a terminal happens only in this package."""

from __future__ import annotations

from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from dermkohya import __version__
from dermkohya.errors import DermkohyaError, ProblemsError

console = Console()
err_console = Console(stderr=True)


class _Group(click.Group):
    """Turns a user mistake into one red message and exit 1; a bug keeps its traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ProblemsError as exc:
            err_console.print(f"[bold red]error:[/] {escape(exc.source)}: {len(exc.problems)} problem(s)", highlight=False)
            for problem in exc.problems:
                err_console.print(f"  [red]-[/] {escape(problem)}", highlight=False, soft_wrap=True)
            ctx.exit(1)
        except DermkohyaError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dermkohya")
@click.option("--project", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="The project folder (holds dermkohya.toml); default: found upward from the run file, then the working folder.")
def main(project: Path | None) -> None:
    """Dermatology photographs to a kohya-trained Stable Diffusion LoRA, reproducibly."""


def _in_project(path: Path) -> tuple[Path, Path]:
    """The project root for a command given `path`, and `path` for render/train/collect: as typed when
    the working folder is the root (messages then show it as typed), else absolute — from the working
    folder, or from `--project` where only that holds it."""
    import os

    from dermkohya import project

    root = project.resolve_root(click.get_current_context().find_root().params.get("project"), path)
    if Path.cwd().resolve() == root.resolve():
        return root, path
    absolute = Path(os.path.abspath(path))
    return root, root / path if not absolute.exists() and (root / path).exists() else absolute


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


# The commands register themselves on `main` when their modules are imported.
from dermkohya.cli import data, runs, synthetic  # noqa: E402,F401
