"""Run files and what becomes of them: render, adopt, train (and its queue), sweep, runs, collect, inspect, merge, resize."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from dermkohya.cli import _in_project, _print_warnings, console, err_console, main
from dermkohya.errors import DermkohyaError

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
@click.option("--skip-memory-check", is_flag=True,
              help="Launch even where the run's measured peak GPU memory exceeds the GPU's free memory.")
@click.option("-v", "--verbose", is_flag=True, help="Say what the pre-launch checks found (the memory check's estimate).")
def train_cmd(run_files: tuple[Path, ...], gpus: str | None, resume: bool, new: bool, strict: bool, online: bool,
              no_collect: bool, break_lock: bool, skip_memory_check: bool, verbose: bool) -> None:
    """check → render → accelerate launch kohya → collect, with one live progress bar.

    Several run files are a queue: trained one after another (or one per GPU of --gpus at a time), past
    any failure, ending with a table; the exit code is non-zero when any run did not finish."""
    import sys

    from dermkohya import collect, train  # collect needs only core dependencies: imported before kohya runs

    if len(run_files) > 1:
        if resume or break_lock or skip_memory_check:
            raise click.UsageError("--resume, --break-lock and --skip-memory-check take one run file")
        _train_queue(run_files, gpus, new=new, strict=strict, online=online, collect=not no_collect)
        return
    root, run_file = _in_project(run_files[0])
    _print_warnings(click.get_current_context().with_resource(
        train.run_lock(run_file, project_root=root, break_lock=break_lock)).warnings)

    with _kohya_progress() as bar:
        result = train.train(run_file, project_root=root, resume=resume, new=new, strict=strict, online=online,
                             on_line=bar.on_line, gpu_ids=gpus, skip_memory_check=skip_memory_check)
    if verbose and result.memory:
        console.print(escape(result.memory), highlight=False, soft_wrap=True)
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


