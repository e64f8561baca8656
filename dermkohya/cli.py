"""The `dermkohya` command line. It parses and prints; the work lives in the module named for it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console
from rich.markup import escape

from dermkohya import __version__
from dermkohya.errors import DermkohyaError, ProblemsError

if TYPE_CHECKING:
    from dermkohya.prepare import record as prepare_record
    from dermkohya.dataset import CheckReport

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


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


# --- run files: render, train ------------------------------------------------------------------

@main.command("render")
@click.argument("run_file", type=click.Path(path_type=Path))
@click.option("--no-kohya-check", is_flag=True, help="Do not check rendered keys against sd-scripts' parser.")
@click.option("--require-kohya", is_flag=True,
              help="Fail where kohya cannot run: ask sd-scripts' parser and import [network] module in kohya's Python.")
def render_cmd(run_file, no_kohya_check: bool, require_kohya: bool) -> None:
    """Write runs/<run>/: config.toml, dataset.toml, sample_prompts.txt, train_command.sh, manifest.json."""
    from dermkohya import kohya, render

    root, run_file = _in_project(run_file)
    rendered = render.render(run_file, project_root=root, check_keys=not no_kohya_check)
    if require_kohya:  # errors, not the warnings a render without kohya gives; the option list is cached
        render.check_keys_against_kohya(rendered.spec.script, rendered.config_keys, rendered.run_file,
                                        kohya.argument_names(rendered.spec.script, root))
        kohya.verify_network_module(rendered.spec.network.module, root)
    for warning in rendered.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    console.print(f"[bold]{rendered.name}[/]: rendered {len(rendered.files)} files into {rendered.out_dir}")
    for name, path in rendered.files.items():
        console.print(f"  {path}", highlight=False)
    if rendered.spec.method != "lora":  # phase 1's files; phase 2's are rendered by train onto the derived base
        from dermkohya import ti

        phases = ti.render_ti(run_file, project_root=root, check_keys=not no_kohya_check).phases
        console.print(f"textual inversion: {len(phases)} kohya run(s), one per token, in {rendered.out_dir / 'ti'}")
        for phase in phases:
            console.print(f"  {phase.out_dir}  {phase.token.string if phase.token else ''}", highlight=False, markup=False)


@main.command("adopt")
@click.argument("source", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--name", required=True, help="The run's name: writes runs/NAME.toml (never replaces one).")
@click.option("--command", "command", default=None, help="An `accelerate launch ... train_network.py --flags` line, instead of SOURCE.")
@click.option("--base", default=None, help="The base model's path (wins over the source's).")
@click.option("--train-data-dir", default=None, help="The parent of the N_concept image folders (wins over the source's).")
@click.option("--dataset-config", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The sd-scripts --dataset_config the source trains with (when the source does not name it).")
@click.option("--family", type=click.Choice(["sd15", "sdxl"]), default=None,
              help="For an sd-scripts config, which names no script: sd15 (train_network.py, default) or sdxl.")
def adopt_cmd(source: Path | None, name: str, command: str | None, base: str | None, train_data_dir: str | None,
              dataset_config: Path | None, family: str | None) -> None:
    """A kohya_ss GUI config, an sd-scripts config or a command line → runs/NAME.toml, with a note for every key."""
    from dermkohya import adopt, project

    root = project.resolve_root(click.get_current_context().find_root().params.get("project"))
    path, adopted = adopt.adopt(source, name, project_root=root, command=command, base=base, train_data_dir=train_data_dir,
                                dataset_config=dataset_config, family=family, cwd=Path.cwd())
    counts = {kind: sum(n.kind == kind for n in adopted.notes) for kind in ("converted", "dropped", "dermkohya", "needs you")}
    console.print(f"[bold]{name}[/]: wrote {path} ({counts['converted']} converted, {counts['dropped']} dropped, "
                  f"{counts['dermkohya']} dermkohya choices; each noted in the file)", highlight=False)
    for note in adopted.notes:
        if note.kind == "needs you":
            err_console.print(f"[yellow]needs you:[/] {escape(note.key)}: {escape(note.text)}", highlight=False, soft_wrap=True)
    if adopted.differences:
        console.print(f"rendered differently from the source (why: in the file): {escape(', '.join(sorted(adopted.differences)))}",
                      highlight=False, soft_wrap=True)
    console.print(f"next: dermkohya render {path}", highlight=False)


@main.command("train")
@click.argument("run_files", metavar="RUN_FILE...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--gpus", default=None, metavar="IDS",
              help="GPU ids, e.g. 0,1: with several run files one run per GPU at a time; replaces [launch] gpu_ids.")
@click.option("--resume", is_flag=True, help="Continue from kohya's last saved state in output/<run>/.")
@click.option("--new", is_flag=True, help="Keep a previous run's outputs as output/<run>.N and start afresh.")
@click.option("--strict", is_flag=True, help="Dataset warnings and a different sd-scripts commit are errors.")
@click.option("--online", is_flag=True, help="Let kohya reach the Hugging Face hub (default: HF_HUB_OFFLINE=1).")
@click.option("--no-collect", is_flag=True, help="Leave the LoRA in output/<run>/ without collecting it.")
@click.option("--break-lock", is_flag=True, help="Take the run's lock from a dermkohya on another host that no longer runs.")
def train_cmd(run_files: tuple[Path, ...], gpus: str | None, resume: bool, new: bool, strict: bool, online: bool,
              no_collect: bool, break_lock: bool) -> None:
    """check → render → accelerate launch kohya → collect, with one live progress bar.

    Several run files are a queue: trained one after another (or one per GPU of --gpus at a time), past
    any failure, ending with a table; the exit code is non-zero when any run did not finish."""
    import sys

    from dermkohya import collect, train  # collect needs only core dependencies: imported before kohya runs

    if len(run_files) > 1:
        if resume or break_lock:
            raise click.UsageError("--resume and --break-lock take one run file")
        _train_queue(run_files, gpus, new=new, strict=strict, online=online, collect=not no_collect)
        return
    root, run_file = _in_project(run_files[0])
    _print_warnings(click.get_current_context().with_resource(
        train.run_lock(run_file, project_root=root, break_lock=break_lock)).warnings)

    with _kohya_progress() as bar:
        result = train.train(run_file, project_root=root, resume=resume, new=new, strict=strict, online=online,
                             on_line=bar.on_line, gpu_ids=gpus)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if result.note is not None:
        console.print(escape(result.note), highlight=False, soft_wrap=True)
        return
    if result.returncode != 0:
        if result.interrupted:
            err_console.print(f"[bold red]stopped[/] by {result.stopped.signal if result.stopped else 'a signal'}: "
                              "kohya's whole process group was stopped.", highlight=False)
        else:
            err_console.print(f"[bold red]kohya failed[/] (exit {result.returncode}); last lines of {result.log_path}:", highlight=False)
            for line in result.tail[-15:]:
                err_console.print(f"  {line}", highlight=False, markup=False)
        if result.hint:
            err_console.print(f"[bold]hint:[/] {escape(result.hint)}", highlight=False, soft_wrap=True)
        if result.saved_states:
            err_console.print(f"saved state: {result.saved_states[-1]} — continue with `dermkohya train {run_file} --resume`", highlight=False)
        else:
            err_console.print(escape("no kohya state was saved (states are saved at epoch ends when [train] save_state = true)"))
        if result.final_before_failure is not None and not no_collect:
            try:
                artifact = collect.collect(run_file, project_root=root, new_version=new, after_failure=True)
            except DermkohyaError as exc:
                err_console.print(f"[yellow]not collected:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            else:
                err_console.print(f"[yellow]collected[/] {artifact}: kohya failed only after writing its final LoRA, which "
                                  f"verified complete; the exit code ({result.returncode}) is kohya's", highlight=False, soft_wrap=True)
        sys.exit(result.returncode)
    beside = (f"; checked {' and '.join(result.overlapped_checks)} while kohya started"
              if result.overlapped_checks else "")
    console.print(f"[green]trained[/] {result.lora} in {result.kohya_seconds:.0f} s "
                  f"(dermkohya's own time: {result.overhead_seconds:.2f} s{beside})")
    if not no_collect:
        artifact = collect.collect(run_file, project_root=root, new_version=new)  # a fresh run (--new) is a new result: a new version, never a replacement
        console.print(f"[green]collected[/] {artifact}")


class _KohyaBar:
    """A live bar of kohya's steps, rate and loss, fed by `on_line`; `restart` starts it afresh for the next run."""

    def __init__(self, bar) -> None:
        self.bar, self.task, self.phase = bar, bar.add_task("steps", total=None, rate="–", loss="–"), ""

    def restart(self) -> None:
        self.bar.reset(self.task, total=None, rate="–", loss="–")

    def on_line(self, line: str) -> None:
        from dermkohya import kohya

        progress = kohya.parse_progress(line)
        if progress:
            self.bar.update(self.task, total=progress.total, completed=progress.step,
                            rate=f"{progress.it_per_s:.2f} it/s" if progress.it_per_s else "–",
                            loss=f"{progress.loss:.4f}" if progress.loss is not None else "–")
        elif any(key in line for key in ("caching latents", "epoch ", "saving", "generating sample", "Loading")):
            if line != self.phase:
                self.phase = line
                self.bar.console.print(f"[dim]{escape(line[:160])}[/]", highlight=False)


def _kohya_progress():
    """The progress display of `train`: yields a `_KohyaBar`."""
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    @contextmanager
    def bar_context():
        columns = [TextColumn("[bold]kohya[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                   TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn()]
        with Progress(*columns, console=console, transient=False) as bar:
            yield _KohyaBar(bar)

    return bar_context()


# --- a queue of runs, the runs of a project, sweeps (queue.py, sweep.py) -----------------------------

def _train_queue(run_files: tuple[Path, ...], gpus: str | None, *, new: bool, strict: bool, online: bool,
                 collect: bool) -> None:
    """`dermkohya train A.toml B.toml …`: the queue (queue.py), then its table; exit 1 when any run did not finish."""
    import sys

    root, _ = _in_project(run_files[0])
    paths = [_in_project(path)[1] for path in run_files]
    rows = _run_queue(paths, root, gpus=gpus.split(",") if gpus else None, new=new, strict=strict, online=online,
                      collect=collect)
    _print_queue_table(rows, root)
    if not all(row.ok for row in rows):
        sys.exit(1)


def _run_queue(paths: list[Path], root: Path, *, gpus: list[str] | None, **options):
    """The queue with one progress bar (one run at a time) or a line per started run (one run per GPU)."""
    from dermkohya import queue

    def announce(name: str, path: Path, gpu: str | None) -> None:
        where = f" on GPU {gpu}" if gpu is not None else ""
        console.print(f"[bold]{escape(name)}[/]: training {escape(str(path))}{where}", highlight=False)

    if gpus and len(gpus) > 1:
        console.print(f"one run per GPU ({', '.join(gpus)}); each run's output: {queue.QUEUE_DIR}/logs-*/<run>.log",
                      highlight=False)
        return queue.run_queue(paths, project_root=root, gpus=gpus, on_start=announce, **options)
    with _kohya_progress() as bar:
        def on_start(name: str, path: Path, gpu: str | None) -> None:
            bar.restart()
            announce(name, path, gpu)

        return queue.run_queue(paths, project_root=root, gpus=gpus, on_start=on_start, on_line=bar.on_line, **options)


def _shown(path: Path | None, root: Path) -> str:
    """A path relative to the project where it lies inside it."""
    if path is None:
        return "–"
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _print_queue_table(rows, root: Path) -> None:
    from rich.table import Table

    table = Table(title="queue", title_justify="left")
    for column in ("run", "result", "time", "final loss", "artifact"):
        table.add_column(column, justify="right" if column in ("time", "final loss") else "left", overflow="fold",
                         no_wrap=column in ("run", "result"))
    for row in rows:
        colour = "green" if row.ok else "red" if row.result != "not run" else "yellow"
        minutes, seconds = divmod(round(row.seconds), 60)
        table.add_row(escape(row.run), f"[{colour}]{row.result}[/]", f"{minutes}:{seconds:02d}",
                      "–" if row.loss is None else f"{row.loss:.4f}", escape(_shown(row.artifact, root)))
    console.print(table)
    for row in rows:
        if row.message:
            err_console.print(f"[red]{escape(row.run)}:[/] {escape(row.message)}", highlight=False, soft_wrap=True)


@main.command("sweep")
@click.argument("sweep_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--gpus", default=None, metavar="IDS", help="Train one variant per GPU at a time, e.g. 0,1.")
@click.option("--new", is_flag=True, help="Train every variant afresh (default: keep variants already collected).")
@click.option("--slurm", is_flag=True, help="Write runs/<sweep>.sbatch.sh (a job array) instead of training here.")
@click.option("--submit", is_flag=True, help="With --slurm: sbatch the script.")
@click.option("--render-only", is_flag=True, help="Write the variants' run files and stop.")
def sweep_cmd(sweep_file: Path, gpus: str | None, new: bool, slurm: bool, submit: bool, render_only: bool) -> None:
    """A sweep file → runs/<sweep>-<variant>.toml → the queue (or SLURM) → reports/sweep-<name>.md/.json/.png."""
    import sys

    from dermkohya import sweep

    if submit and not slurm:
        raise click.UsageError("--submit goes with --slurm")
    root, sweep_file = _in_project(sweep_file)
    loaded = sweep.load_sweep(sweep_file, root)
    run_files = sweep.render_variants(loaded, root)
    console.print(f"[bold]{escape(loaded.name)}[/]: {len(run_files)} variants of {escape(loaded.spec.base)}", highlight=False)
    for path, (variant, overrides) in zip(run_files, loaded.variants.items()):
        changes = ", ".join(f"{k} = {v!r}" for k, v in overrides.items())
        console.print(f"  {escape(str(path))}  [dim]{escape(changes)}[/]", highlight=False, soft_wrap=True)
    if slurm:
        script = sweep.write_sbatch(loaded, root, run_files)
        if submit:
            job = sweep.submit(script, loaded, root, run_files)
            console.print(f"[green]submitted[/] job {escape(job)} ({len(run_files)} tasks); `dermkohya runs` shows their states",
                          highlight=False)
        else:
            console.print(f"wrote {escape(str(script))}; submit it with `sbatch {escape(_shown(script, root))}` "
                          "(or --submit); commit the run files first", highlight=False)
        return
    if render_only:
        return
    with _kohya_progress() as bar:
        def on_start(name: str, path: Path, gpu: str | None) -> None:
            bar.restart()
            console.print(f"[bold]{escape(name)}[/]: training {escape(str(path))}" + (f" on GPU {gpu}" if gpu else ""),
                          highlight=False)

        parallel = gpus and "," in gpus
        rows, records = sweep.run_sweep(loaded, root, run_files, gpus=gpus.split(",") if gpus else None, new=new,
                                        on_line=None if parallel else bar.on_line, on_start=on_start,
                                        on_note=lambda line: console.print(escape(line), highlight=False))
    if rows:
        _print_queue_table(rows, root)
    json_path, md_path = sweep.write_report(loaded, records, root)
    console.print(f"[green]report[/] {escape(_shown(md_path, root))} (+ {escape(json_path.name)}, plot)", highlight=False)
    if not all(r.state == "collected" and r.note is None for r in records):
        sys.exit(1)


@main.command("runs")
@click.option("--json", "as_json", is_flag=True, help="Print every run as JSON.")
def runs_cmd(as_json: bool) -> None:
    """Every run of the project: state, steps, last loss, artifact, evaluation headline."""
    import json

    from rich.table import Table

    from dermkohya import project, queue

    root = project.resolve_root(click.get_current_context().find_root().params.get("project"))
    infos = queue.project_runs(root)
    if as_json:
        click.echo(json.dumps([queue.run_info_dict(info) for info in infos], indent=2, ensure_ascii=False))
        return
    if not infos:
        console.print(f"no runs in {root}/runs yet: copy runs/demo.toml, or `dermkohya adopt` a kohya config", highlight=False)
        return
    colours = {"running": "cyan", "queued": "blue", "finished": "green", "collected": "green", "failed": "red",
               "stopped": "yellow"}
    table = Table(title=f"runs of {root}", title_justify="left")
    for column in ("run", "state", "steps", "last loss", "artifact", "evaluation"):
        table.add_column(column, justify="right" if column in ("steps", "last loss") else "left", overflow="fold",
                         no_wrap=column in ("run", "state"))
    for info in infos:
        state = info.state
        if info.pid is not None:
            state += f" (pid {info.pid}{'' if info.host is None else ' on ' + info.host})"
        elif info.queued_by:
            state += f" ({info.queued_by})"
        headline = ", ".join(f"{k} {v:.4g}" for k, v in (info.evaluation or {}).items())
        table.add_row(escape(info.name), f"[{colours.get(info.state, 'dim')}]{escape(state)}[/]", info.steps or "–",
                      "–" if info.loss is None else f"{info.loss:.4f}", escape(_shown(info.artifact, root)),
                      escape(headline or info.evaluation_report or "–"))
    console.print(table)


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


# --- collect, inspect, merge, resize -------------------------------------------------------------

@main.command("collect")
@click.argument("run")
@click.option("--which", default="final", show_default=True, help="final, epoch:N or step:N (kohya's saved checkpoints).")
@click.option("--new-version", is_flag=True, help="File a different result as artifacts/<run>/<run>-vN.safetensors.")
@click.option("--break-lock", is_flag=True, help="Take the run's lock from a dermkohya on another host that no longer runs.")
def collect_cmd(run: str, which: str, new_version: bool, break_lock: bool) -> None:
    """Verify kohya's LoRA for RUN (name or run file) and file it in artifacts/<run>/ with card and manifest."""
    from dermkohya import collect

    root, _ = _in_project(Path(run))
    _print_warnings(click.get_current_context().with_resource(
        collect.run_lock(run, project_root=root, break_lock=break_lock)).warnings)

    artifact = collect.collect(run, project_root=root, which=which, new_version=new_version)
    console.print(f"[green]collected[/] {artifact}", highlight=False, soft_wrap=True)
    for path in sorted(artifact.parent.iterdir()):
        if not path.name.startswith("."):
            console.print(f"  {path}", highlight=False, soft_wrap=True)


@main.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole summary as JSON.")
def inspect_cmd(file: Path, as_json: bool) -> None:
    """Summarise a kohya/diffusers LoRA: metadata by group, rank, alpha, modules, size, hash check."""
    import json

    from rich.table import Table

    from dermkohya import collect

    summary = collect.inspect(file)
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True, ensure_ascii=False))
        return
    if summary.get("kind") == "textual inversion embedding":
        shapes = ", ".join(f"{k} {v['shape']} {v['dtype']}" for k, v in summary["tensors"].items())
        console.print(f"[bold]{file}[/]  textual-inversion embedding, token {summary['token'] or '(not recorded)'}, "
                      f"{summary['vectors']} vector(s): {shapes}", highlight=False)
        for key, value in summary["dermkohya"].items():
            console.print(f"  {key} = {value}", highlight=False, markup=False)
        return
    digest = summary["hash"]
    verdict = {True: "[green]valid[/]", False: "[bold red]MISMATCH: tensors altered after training[/]", None: "[yellow]no sshs_model_hash recorded[/]"}[digest["ok"]]
    console.print(f"[bold]{file}[/]  {summary['size_mb']} MiB, {summary['format']} {summary['family'] or ''} LoRA, "
                  f"rank {summary['rank']}, alpha {summary['alpha']}, {summary['tensors']} tensors {summary['dtypes']}", highlight=False)
    console.print(f"modules: {summary['modules']}", highlight=False)
    for part, blocks in summary["blocks"].items():
        console.print(f"  {part}: " + ", ".join(f"{b} ×{n}" for b, n in blocks.items()), highlight=False)
    console.print(f"hash: {verdict} (sha256 of tensors {digest['computed'][:16]}…)", highlight=False)
    for problem in summary["kohya_problems"] + [f"NaN/Inf in {n}" for n in summary["non_finite_tensors"][:5]]:
        err_console.print(f"[yellow]warning:[/] {problem}", highlight=False)
    for group, values in summary["metadata"].items():
        if not values:
            continue
        table = Table(title=f"{group} ({len(values)})", title_justify="left", show_header=False, box=None)
        table.add_column("key", no_wrap=True)
        table.add_column("value", overflow="fold")
        for key, value in values.items():
            table.add_row(key, value if len(value) <= 200 else value[:200] + "…")
        console.print(table)


@main.command("merge")
@click.option("--base", required=True, type=click.Path(path_type=Path), help="SD 1.5/SDXL checkpoint (.safetensors) or SD 1.5 diffusers folder.")
@click.option("--lora", "loras", required=True, multiple=True, metavar="FILE[:WEIGHT]", help="A LoRA and its weight (default 1.0); repeat to merge several.")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="The merged checkpoint (.safetensors); never replaced.")
@click.option("--precision", default="float", show_default=True, type=click.Choice(["float", "fp16", "bf16"]), help="Precision of the merge arithmetic.")
@click.option("--save-precision", type=click.Choice(["float", "fp16", "bf16"]), help="Precision of the saved weights (default: --precision).")
def merge_cmd(base: Path, loras: tuple[str, ...], out: Path, precision: str, save_precision: str | None) -> None:
    """Bake LoRAs into a base checkpoint with sd-scripts' merge_lora.py / sdxl_merge_lora.py."""
    from dermkohya import merge

    record = merge.merge(base, [merge.parse_lora_arg(t) for t in loras], out, precision=precision, save_precision=save_precision)
    inputs = ", ".join(f"{r['file']}×{r['weight']:g}" for r in record["loras"])
    console.print(f"[green]merged[/] {inputs} into {record['base']['file']} → {out} "
                  f"({record['verified']['tensors']} tensors, {record['verified']['changed_tensors']} changed; record {out.with_suffix('.json')})", highlight=False)


@main.command("resize")
@click.argument("lora_file", type=click.Path(path_type=Path))
@click.option("--rank", required=True, type=int, help="The new rank (the maximum with --dynamic).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="The resized LoRA (.safetensors); never replaced.")
@click.option("--save-precision", type=click.Choice(["float", "fp16", "bf16"]), help="Precision of the saved weights (kohya's default: float).")
@click.option("--dynamic", type=click.Choice(["sv_ratio", "sv_fro", "sv_cumulative"]), help="kohya's dynamic rank method.")
@click.option("--dynamic-param", type=float, help="Target for --dynamic.")
def resize_cmd(lora_file: Path, rank: int, out: Path, save_precision: str | None, dynamic: str | None, dynamic_param: float | None) -> None:
    """Change a LoRA's rank with sd-scripts' resize_lora.py (SVD), verified and recorded."""
    from dermkohya import merge

    record = merge.resize(lora_file, rank, out, save_precision=save_precision, dynamic_method=dynamic, dynamic_param=dynamic_param)
    console.print(f"[green]resized[/] {lora_file} → {out} (rank {record['rank']}, alpha {record['alpha']})", highlight=False)


@main.command("generate")
@click.argument("plan_file", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: synthetic/<plan name>).")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(1), help="Processes (one per GPU); the files do not depend on it.")
@click.option("--limit", type=click.IntRange(1), help="Stop after about this many new images; rerun to continue.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show the progress bar.")
def generate_cmd(plan_file: Path, out: Path | None, processes: int, limit: int | None, progress: bool) -> None:
    """Generate a plan's images, balanced over diagnosis × Fitzpatrick type; resumable."""
    from dermkohya import generate

    result = generate.generate(plan_file, out=out, processes=processes, limit=limit, show_progress=progress)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    rejected = ", ".join(f"{k} ×{v}" for k, v in sorted(result.rejected.items())) or "none"
    rate = f", {result.images_per_s:.2f} images/s" if result.images_per_s else ""
    state = "[green]done[/]" if result.complete else "[yellow]partial[/] (rerun to continue)"
    console.print(f"{state} " + escape(f"{result.finished}/{result.planned} images in {result.out} ({result.made} new{rate}; "
                  f"rejected and regenerated: {rejected}); index: {result.out / 'index.csv'}"), highlight=False)


class _MetricSkipOption(click.Option):
    """`--skip`'s help names the registered metrics (dermkohya/metrics/), read only when help is shown."""

    def get_help_record(self, ctx: click.Context):
        from dermkohya.metrics import registry

        self.help = registry.skip_help()
        return super().get_help_record(ctx)


@main.command("utility")
@click.option("--train", "train_dir", required=True, type=click.Path(path_type=Path), help="Real training split: datasets/<ds>/prepared/train (with metadata.csv) or the CSV.")
@click.option("--heldout", required=True, type=click.Path(path_type=Path), help="Real held-out split: datasets/<ds>/prepared/heldout or the CSV.")
@click.option("--synthetic", required=True, type=click.Path(path_type=Path), help="A generated set: synthetic/<plan> (with index.csv).")
@click.option("--name", help="Report name: reports/utility-<name>.json (default: the synthetic folder's name).")
@click.option("--model", default="resnet18", show_default=True, help="timm architecture: resnet18 or efficientnet_b0.")
@click.option("--weights", type=click.Path(path_type=Path, dir_okay=False), help="Local pretrained weights of --model (default: from scratch).")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(1), help="Training seeds per arm.")
@click.option("--seed", default=0, show_default=True, help="First seed (and the synthetic draw's seed).")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(16), help="Side of the square the images are resized to.")
@click.option("--synthetic-share", help="Share of each skin type's training images that are synthetic, e.g. I=0.2,II=0.2,III=0.3,IV=0.5,V=0.7,VI=0.8 (the default).")
@click.option("--bootstrap", default=200, show_default=True, type=click.IntRange(1), help="Bootstrap resamples for the intervals.")
@click.option("--min-images", default=10, show_default=True, type=click.IntRange(1), help="Fewest held-out images for a cell's figures.")
@click.option("--min-positives", default=5, show_default=True, type=click.IntRange(1), help="Fewest held-out images of a class per skin type for its equal-opportunity gap.")
@click.option("--device", help="cuda, cuda:1, cpu (default: cuda when available).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0), help="Image-loading processes.")
@click.option("--out", "out_dir", default=Path("reports"), show_default=True, type=click.Path(path_type=Path))
def utility_cmd(train_dir: Path, heldout: Path, synthetic: Path, name: str | None, model: str, weights: Path | None, seeds: int, seed: int,
                epochs: int, batch_size: int, lr: float, image_size: int, synthetic_share: str | None, bootstrap: int, min_images: int,
                min_positives: int, device: str | None, workers: int, out_dir: Path) -> None:  # fmt: skip
    """Train a classifier on real vs real + synthetic images; AUROC, balanced accuracy and fairness per skin type."""
    from dermkohya import utility
    from dermkohya.utility.data import parse_shares

    training = utility.TrainOptions(model=model, weights=weights, epochs=epochs, batch_size=batch_size, lr=lr, image_size=image_size, workers=workers)
    options = utility.Options(training=training, seeds=seeds, seed=seed, shares=parse_shares(synthetic_share), bootstrap=bootstrap,
                              min_images=min_images, min_positives=min_positives, device=device)
    report = utility.run(train_dir, heldout, synthetic, name=name, out_dir=out_dir, options=options,
                         progress=lambda line: console.print(escape(line), highlight=False))
    for note in report["notes"]:
        err_console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    a, b, d = report["arms"]["real"]["overall"]["auroc"], report["arms"]["real_synthetic"]["overall"]["auroc"], report["difference"]["overall"]["auroc"]
    shown = " ".join(f"{label} {fig['value']:.3f}" if fig["value"] is not None else f"{label} –" for label, fig in (("real", a), ("real+synthetic", b), ("Δ", d)))
    console.print("[green]utility[/] " + escape(f"{report['name']}: overall AUROC {shown} → {out_dir / ('utility-' + report['name'] + '.md')}"), highlight=False)


@main.command("evaluate")
@click.option("--real", required=True, type=click.Path(path_type=Path), help="Held-out images: a folder with metadata.csv (datasets/<ds>/prepared/heldout) or the CSV.")
@click.option("--synthetic", required=True, type=click.Path(path_type=Path), help="A generated set: synthetic/<plan> (with index.csv).")
@click.option("--train", type=click.Path(path_type=Path), help="Training images for the memorisation check (default: prepared/train beside --real).")
@click.option("--weights", type=click.Path(path_type=Path), help="Folder holding the weight files (default: $DERMKOHYA_WEIGHTS or ~/.cache/dermkohya/weights).")
@click.option("--inception", type=click.Path(path_type=Path), help="pt_inception-2015-12-05-6726825d.pth (default: in --weights).")
@click.option("--lpips", "lpips_dir", type=click.Path(path_type=Path), help="Folder with alexnet-owt-7be5be79.pth (default: <weights>/lpips).")
@click.option("--clip", "clip_dir", type=click.Path(path_type=Path), help="A transformers CLIP folder (default: <weights>/clip).")
@click.option("--skip", cls=_MetricSkipOption, default="", help="Metrics to leave out, comma-separated.")
@click.option("--threshold", default=0.95, show_default=True, type=float, help="CLIP cosine similarity at which a synthetic image counts as memorised.")
@click.option("--out", "out_dir", default=Path("reports"), show_default=True, type=click.Path(path_type=Path), help="Where reports/<plan>.json and .md go.")
def evaluate_cmd(real: Path, synthetic: Path, train: Path | None, weights: Path | None, inception: Path | None, lpips_dir: Path | None,
                 clip_dir: Path | None, skip: str, threshold: float, out_dir: Path) -> None:  # fmt: skip
    """FID, KID, LPIPS, CLIP score, diversity and memorisation of a synthetic set, per skin type and diagnosis."""
    from dermkohya import evaluate

    skipped = {s.strip() for s in skip.split(",") if s.strip()}
    if unknown := skipped - set(evaluate.METRICS):
        raise click.BadParameter(f"unknown metric(s) {', '.join(sorted(unknown))}; choose from {', '.join(evaluate.METRICS)}", param_hint="--skip")
    files = evaluate.Weights.under(weights or evaluate.default_weights_dir(), inception, lpips_dir, clip_dir)
    options = evaluate.Options(enabled=tuple(m for m in evaluate.METRICS if m not in skipped), threshold=threshold)
    report = evaluate.evaluate(real, synthetic, weights=files, train=train, out_dir=out_dir, options=options)
    overall = report.rows[0]
    figures = ", ".join(f"{k} {v:.4g}" for k, v in report.headline().items())
    flagged = f"; {report.memorisation['flagged']} flagged as memorised" if report.memorisation else ""
    console.print("[green]evaluated[/] " + escape(f"{report.plan}: {overall['n_synthetic']} synthetic vs {overall['n_real']} real"
                  f"{' (' + figures + ')' if figures else ''}{flagged} → {out_dir / (report.plan + '.md')}"), highlight=False)


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on; any other than localhost needs $DERMKOHYA_TOKEN.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535))
@click.option("--gpus", default=None, metavar="IDS", help="One job worker per GPU, e.g. 0,1 (default: one worker, all devices visible).")
def serve_cmd(host: str, port: int, gpus: str | None) -> None:
    """HTTP API (/docs), web UI and job queue over the project's runs, adapters, generations and reports."""
    from dermkohya import project

    try:
        from dermkohya.serve.app import serve
    except ImportError as exc:
        raise DermkohyaError(f"dermkohya serve needs the serve extra ({exc.name} is missing): pip install 'dermkohya[serve]'") from None
    root = project.resolve_root(click.get_current_context().find_root().params.get("project"))
    console.print(f"serving {escape(str(root))} on http://{escape(host)}:{port} (API docs: /docs); Ctrl-C stops", highlight=False)
    serve(root, host, port, [g.strip() for g in gpus.split(",") if g.strip()] if gpus else None)
