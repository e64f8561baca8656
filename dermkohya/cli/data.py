"""Projects and data: init, prepare, base models, check, demo-data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape

from dermkohya.cli import console, err_console, main

if TYPE_CHECKING:
    from dermkohya.dataset import CheckReport
    from dermkohya.prepare import record as prepare_record

@main.command("init")
@click.argument("directory", type=click.Path(path_type=Path))
def init_cmd(directory: Path) -> None:
    """Make DIRECTORY a dermkohya project: runs/, datasets/, plans/, sweeps/, dermkohya.toml, Makefile, .gitignore."""
    from dermkohya import project

    written = project.init(directory)
    for path in written:
        console.print(f"  {path}", highlight=False, soft_wrap=True)
    state = f"[green]created[/] {len(written)} files" if written else "nothing to add: the project has every file"
    console.print(f"{state} in {directory}; next: `cd {directory} && make train` (the demo), then your own run file", highlight=False)


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
    for line in _prepare_summary(result, recipe.parent):
        console.print(line, highlight=False, soft_wrap=True)
    for line in result.balance.unreachable:
        err_console.print(f"[yellow]balance:[/] {escape(line)}", highlight=False)
    for line in result.notes:
        err_console.print(f"[dim]note:[/] {escape(line)}", highlight=False)


def _prepare_summary(record: prepare_record.Prepared, recipe_dir: Path) -> list[str]:
    """Per skin type, images and effective samples against the target; then the balance verdict."""
    split, balance = record.split, record.balance
    lines = [f"{recipe_dir / record.train_data_dir}: {split.train_images} training images in {len(record.subsets)} "
             f"subsets ({record.effective_samples} effective samples per epoch); {split.heldout_images} held out in "
             f"{recipe_dir / record.heldout_dir}",
             f"{'skin type':<10} {'images':>7} {'effective':>10} {'share':>7} {'target':>7}"]
    for row in record.by_skin_type():
        goal = f"{100 * row.target:.1f} %" if row.target is not None else "–"
        lines.append(f"{row.fst:<10} {row.images:>7} {row.effective:>10} {100 * row.share:>5.1f} % {goal:>7}")
    if balance.policy == "none":
        lines.append("balance: none (every subset at 1 repeat)")
    elif balance.within_tolerance:
        lines.append(f"[green]balance {balance.policy}: every share within ±{balance.tolerance:.0%} of its target[/]")
    else:
        lines.append(f"[yellow]balance {balance.policy}: {len(balance.unreachable)} target(s) not reached (below)[/]")
    if record.images is None:
        lines.append("dry run: nothing written")
    else:
        lines.append("images: " + ", ".join(f"{n} {action}" for action, n in record.images.items()))
        lines.append(f"content hash sha256:{record.content_hash}")
    return lines


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
        _print_check_report(report)
    if report.has_errors(strict):
        raise SystemExit(1)


def _print_check_report(report: CheckReport) -> None:
    """The check report for a terminal: summary tables, then each kind of problem with its files and fix."""
    from rich.table import Table
    from rich.text import Text

    from dermkohya.dataset import CLIP_CHUNK_TOKENS, CODES

    scan = "full decode" if report.decode else "header scan"
    reg = (f"; train {report.images - report.reg_images} images ({report.effective_samples - report.reg_effective_samples} "
           f"effective samples), reg {report.reg_images} images ({report.reg_effective_samples})" if report.reg_subsets else "")
    console.print(Text.assemble(
        (str(report.root), "bold"), f": {report.images} images in {len(report.subsets)} subset(s){reg}; captions "
        f"{report.caption_extension}, resolution {report.resolution[0]}×{report.resolution[1]}, {scan} "
        f"in {report.seconds:.1f} s"))
    if report.subsets:
        table = Table(title="subsets", title_justify="left")
        for column in ("folder", "repeats", "concept", "images", "effective samples"):
            table.add_column(column, justify="right" if column in ("repeats", "images", "effective samples") else "left")
        for s in report.subsets:
            kind = " (reg)" if s.is_reg else " (fine-tuning)" if s.kind == "fine-tuning" else ""
            table.add_row(Text(report.subset_label(s) + kind), str(s.repeats), Text(s.concept), str(len(s.images)),
                          str(s.effective_samples))
        console.print(table)
    for title, counts in (("Fitzpatrick skin type", report.fst_counts), ("diagnosis", report.diagnosis_counts)):
        if counts:
            table = Table(title=f"per {title}", title_justify="left")
            table.add_column(title)
            table.add_column("images", justify="right")
            table.add_column("effective samples", justify="right")
            table.add_column("share", justify="right")
            total = sum(c["effective"] for c in counts.values()) or 1
            for key, c in counts.items():
                table.add_row(Text(key), str(c["images"]), str(c["effective"]), f"{100 * c['effective'] / total:.1f} %")
            console.print(table)
    if any(report.token_histogram.values()):
        how = "CLIP BPE" if report.tokenizer.startswith("CLIP") else "approximate"
        table = Table(title=f"caption tokens ({how}; {CLIP_CHUNK_TOKENS} per chunk)", title_justify="left")
        table.add_column("tokens")
        table.add_column("captions", justify="right")
        table.add_column("")
        top = max(report.token_histogram.values())
        for label, count in report.token_histogram.items():
            if count:
                table.add_row(label, str(count), "█" * max(1, round(30 * count / top)))
        console.print(table)
    shown = 25
    for code, problems in report.by_code().items():
        severity = "error" if any(p.severity == "error" for p in problems) else "warning"
        colour = "red" if severity == "error" else "yellow"
        console.print(Text.from_markup(f"\n[bold {colour}]{severity}[/] [bold]{code}[/] ({len(problems)}): {CODES[code][1]}"))
        table = Table(show_header=False, box=None, padding=(0, 1, 0, 2))
        table.add_column("path", style="bold", overflow="fold")
        table.add_column("problem", overflow="fold")
        for p in problems[:shown]:
            table.add_row(Text(report.display(p.path)), Text(p.message))
        if len(problems) > shown:
            table.add_row(f"… and {len(problems) - shown} more", "(--json lists every one)")
        console.print(table)
        fixes = list(dict.fromkeys(p.fix for p in problems))
        console.print(Text(f"  fix: {fixes[0]}" if len(fixes) == 1 else "  fix: " + "; ".join(fixes[:3]), style="dim"))
    console.print(Text(""))
    if report.errors:
        console.print(Text.from_markup(f"[bold red]✗ {len(report.errors)} error(s)[/], {len(report.warnings)} warning(s)"))
    elif report.warnings:
        console.print(Text.from_markup(f"[bold yellow]! 0 errors, {len(report.warnings)} warning(s)[/] (--strict makes them errors)"))
    else:
        console.print(Text.from_markup("[bold green]✓ no problems[/]"))
    console.print(Text(f"content hash sha256:{report.content_hash}", style="dim"))


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


