"""Synthetic images and what is measured on them: generate, utility, evaluate; and the server."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape

from dermkohya.cli import console, err_console, main
from dermkohya.errors import DermkohyaError

@main.command("generate")
@click.argument("plan_file", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Output folder (default: synthetic/<plan name>).")
@click.option("--processes", default=1, show_default=True, type=click.IntRange(1), help="Processes (one per GPU); the files do not depend on it.")
@click.option("--limit", type=click.IntRange(1), help="Stop after about this many new images; rerun to continue.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show the progress bar.")
@click.option("--break-lock", is_flag=True, help="Take over the output folder's lock left by a generate on another host that no longer runs.")
def generate_cmd(plan_file: Path, out: Path | None, processes: int, limit: int | None, progress: bool, break_lock: bool) -> None:
    """Generate a plan's images, balanced over diagnosis × Fitzpatrick type; resumable.

    Under torchrun or accelerate launch (WORLD_SIZE > 1) each process is one rank, on cuda:LOCAL_RANK,
    across nodes that share the output folder; rank 0 prints the summary."""
    from dermkohya import generate
    from dermkohya.generate.dist import launch_from_env

    result = generate.generate(plan_file, out=out, processes=processes, limit=limit, show_progress=progress, break_lock=break_lock)
    launch = launch_from_env()
    if launch is not None and launch.rank > 0:
        return
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
