"""The `dermkohya` command line. It parses and prints; the work lives in the module named for it."""

from __future__ import annotations

from pathlib import Path

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


@main.command("check")
@click.argument("dataset_path", metavar="DATASET", type=click.Path(path_type=Path))
@click.option("--resolution", default="512", show_default=True, help="Training resolution: 512 or W,H.")
@click.option("--caption-extension", default=".txt", show_default=True, help="Caption extension the run uses.")
@click.option("--decode", is_flag=True, help="Decode every image fully (parallel across cores), not just headers.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--strict", is_flag=True, help="Treat warnings as errors (exit 1).")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes for image inspection.")
def check_cmd(dataset_path: Path, resolution: str, caption_extension: str, decode: bool, as_json: bool,
              strict: bool, workers: int | None) -> None:
    """Check a kohya train_data_dir (or dataset TOML): every problem in one pass; exit 1 on errors."""
    import json

    from dermkohya import dataset

    report = dataset.scan(dataset_path, caption_extension=caption_extension,
                          resolution=dataset.parse_resolution(resolution), decode=decode, workers=workers)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        console.print(report)
    if report.has_errors(strict):
        raise SystemExit(1)


@main.command("demo-data")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--per-cell", default=2, show_default=True, type=click.IntRange(min=1),
              help="Images per diagnosis × skin type.")
@click.option("--size", default=512, show_default=True, type=click.IntRange(min=32), help="Image side in pixels.")
def demo_data_cmd(directory: Path, seed: int, per_cell: int, size: int) -> None:
    """Write the synthetic, non-clinical demo dataset (3 diagnoses × FST I–VI) into DIRECTORY."""
    from dermkohya import demo

    out = demo.make_demo_dataset(directory, seed=seed, per_cell=per_cell, size=size)
    count = len(demo.demo_records(per_cell=per_cell))
    console.print(f"demo dataset: {out} ({count} images, {size}×{size}, seed {seed}; synthetic, not clinical)",
                  highlight=False)


@main.command("prepare")
@click.argument("recipe", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--force", is_flag=True, help="Rebuild even when inputs and outputs are unchanged (same bytes result).")
@click.option("--dry-run", is_flag=True, help="Show counts, split and repeats; write nothing.")
def prepare_cmd(recipe: Path, force: bool, dry_run: bool) -> None:
    """Public metadata CSV + images (datasets/<name>/dataset.toml) → kohya folders, captions, balanced repeats."""
    from rich.progress import Progress

    from dermkohya import prepare

    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("preparing images", total=None)
        result = prepare.prepare(recipe, force=force, dry_run=dry_run,
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))
    for line in prepare.summary_lines(result, recipe.parent):
        console.print(line, highlight=False, soft_wrap=True)
    for line in result["balance"]["unreachable"]:
        err_console.print(f"[yellow]balance:[/] {line}", highlight=False)
    for line in result["notes"]:
        err_console.print(f"[dim]note:[/] {line}", highlight=False)


# --- base models (dermkohya/basemodel.py) ---


@main.group("base")
def base_group() -> None:
    """Identify and hash base models; build the offline random-weight smoke models."""


def _build_smoke(kind: str, directory: str, seed: int, tokenizer_cache: str | None) -> None:
    from pathlib import Path as _Path

    from rich.markup import escape

    from dermkohya import basemodel

    folder = _Path(directory)
    build = basemodel.build_random_sdxl if kind == "sdxl" else basemodel.build_random_sd15
    model = build(folder, seed=seed)
    tokenizers = basemodel.build_tokenizer_cache(_Path(tokenizer_cache) if tokenizer_cache else folder.parent / "tokenizers")
    console.print(f"[bold yellow]SMOKE MODEL, RANDOM WEIGHTS[/] (random:{kind}, seed {seed}): {escape(str(model))}", highlight=False)
    click.echo(f"kohya flags: --pretrained_model_name_or_path {model} --tokenizer_cache_dir {tokenizers}")


_TOKENIZER_HELP = "kohya's --tokenizer_cache_dir to build (default: a 'tokenizers' folder beside DIR)"


@base_group.command("random-sd15")
@click.argument("directory", metavar="DIR")
@click.option("--seed", default=0, show_default=True, help="same seed, same weights")
@click.option("--tokenizer-cache", default=None, help=_TOKENIZER_HELP)
def base_random_sd15(directory: str, seed: int, tokenizer_cache: str | None) -> None:
    """Build a full-size SD 1.5 diffusers folder with random weights (≈2 GB) and the CLIP tokenizer cache."""
    _build_smoke("sd15", directory, seed, tokenizer_cache)


@base_group.command("random-sdxl")
@click.argument("directory", metavar="DIR")
@click.option("--seed", default=0, show_default=True, help="same seed, same weights")
@click.option("--tokenizer-cache", default=None, help=_TOKENIZER_HELP)
def base_random_sdxl(directory: str, seed: int, tokenizer_cache: str | None) -> None:
    """Build a full-size SDXL diffusers folder with random weights (≈7 GB; ≈14 GB of memory while building)."""
    _build_smoke("sdxl", directory, seed, tokenizer_cache)


@base_group.command("hash")
@click.argument("path")
def base_hash(path: str) -> None:
    """SHA-256 of a checkpoint file or diffusers folder (cached by path, size and mtime)."""
    from pathlib import Path as _Path

    from dermkohya import basemodel

    click.echo(f"{basemodel.sha256_path(_Path(path))}  {path}")


@base_group.command("info")
@click.argument("path")
def base_info(path: str) -> None:
    """Format, family and size of a base model, read without loading its weights."""
    from pathlib import Path as _Path

    from rich.markup import escape

    from dermkohya import basemodel

    info = basemodel.identify_base(_Path(path))
    summary = f"{info['path']}: {info['format']}, family {info['family'] or 'unknown'}, {info['size_bytes'] / 1e9:.2f} GB"
    console.print(summary, highlight=False, markup=False, soft_wrap=True)
    if info["smoke"]:
        console.print("[bold yellow]SMOKE MODEL, RANDOM WEIGHTS[/]: for pipeline tests only", highlight=False)
    if info["warning"]:
        err_console.print("[yellow]warning:[/] " + escape(info["warning"]), highlight=False, soft_wrap=True)
