"""The `dermkohya` command line. It parses and prints; the work lives in the module named for it."""

from __future__ import annotations

import click
from rich.console import Console

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
            err_console.print(f"[bold red]error:[/] {exc.source}: {len(exc.problems)} problem(s)", highlight=False)
            for problem in exc.problems:
                err_console.print(f"  [red]-[/] {problem}", highlight=False, soft_wrap=True)
            ctx.exit(1)
        except DermkohyaError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dermkohya")
def main() -> None:
    """Dermatology photographs to a kohya-trained Stable Diffusion LoRA, reproducibly."""
