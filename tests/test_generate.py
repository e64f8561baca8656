"""generate: the plan file, allocation and seeds, and the engine end to end on a tiny random diffusers
pipeline (fast: engine logic, resume, determinism across processes, index.csv, the filter); plus the
issue's done-when on the full-size smoke model with a LoRA kohya trained (`kohya`, `slow`)."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _kohya_run import RUN, kohya_run  # noqa: F401  (the session fixture: one kohya training per session)
from _smoke import link_smoke_model
from click.testing import CliRunner
from PIL import Image

from dermkohya import metrics
from dermkohya.errors import DermkohyaError, ProblemsError
from dermkohya.generate import allocate, generate, image_seed, load_plan, quotas, read_record, render_one

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent


def build_tiny_sd(folder: Path, tokenizer_cache: Path) -> Path:
    """A randomly initialised SD-1.5-shaped pipeline small enough for a CPU test (32 px images)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dermkohya import basemodel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32, attention_head_dim=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
    )  # fmt: skip
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, vocab_size=basemodel.CLIP_VOCAB_SIZE, max_position_embeddings=77, projection_dim=32,
        )  # fmt: skip
    )
    cache = basemodel.build_tokenizer_cache(tokenizer_cache)
    tokenizer = CLIPTokenizer.from_pretrained(str(cache / basemodel.CLIP_L_TOKENIZER_ID.replace("/", "_")))
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(folder))
    return folder


def load_bench() -> Any:
    """bench/generate_throughput.py as a module: its kohya-format random LoRA writer, and its main()."""
    spec = importlib.util.spec_from_file_location("generate_throughput", ROOT / "bench" / "generate_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_kohya_lora(model_dir: Path, path: Path, *, extra_module: str | None = None) -> Path:
    """A random kohya-format LoRA for the pipeline (the benchmark's writer), optionally with one module
    the pipeline does not have."""
    from safetensors.torch import load_file, save_file

    load_bench().write_random_kohya_lora(model_dir, path, rank=4)
    if extra_module:
        tensors = load_file(str(path))
        tensors[f"{extra_module}.lora_down.weight"] = torch.zeros(4, 32, dtype=torch.float16)
        tensors[f"{extra_module}.lora_up.weight"] = torch.zeros(32, 4, dtype=torch.float16)
        tensors[f"{extra_module}.alpha"] = torch.tensor(4.0, dtype=torch.float16)
        save_file(tensors, str(path))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-sd")
    model = build_tiny_sd(root / "model", root / "tokenizers")
    return {"model": model, "lora": write_kohya_lora(model, root / "tiny_lora.safetensors")}


PLAN = """\
name = "{name}"
[model]
base = "{model}"
[[lora]]
path = "{lora}"
weight = 0.8
[classes]
diagnoses = ["melanoma", "basal cell carcinoma"]
skin_types = ["I", "IV", "VI"]
count = {count}
[prompt]
negative = "blurry, text"
[sampler]
steps = 2
width = 32
height = 32
seed = 11
[engine]
batch_size = 3
[filter]
{filter}
"""


def write_plan(folder: Path, tiny: dict[str, Path], *, name: str = "t", count: int = 12, filter: str = "", lora: Path | None = None) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(PLAN.format(name=name, model=tiny["model"], lora=lora or tiny["lora"], count=count, filter=filter), encoding="utf-8")
    return path


def pngs(out: Path) -> dict[str, Path]:
    """Finished images (not rejected/, not staging) by path relative to the output folder."""
    return {p.relative_to(out).as_posix(): p for p in out.glob("*/*/*.png")}


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def read_index(out: Path) -> list[dict[str, str]]:
    with (out / "index.csv").open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --- the plan file -----------------------------------------------------------------------------------------


def test_plan_reports_every_problem_with_the_nearest_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[model]\nbase = "random:sd15"\n[classes]\ndiagnoses = ["melanoma"]\nskin_types = ["I", "VII"]\ncount = 0\n'
        "[sampler]\nstpes = 20\nscheduler = \"heun\"\n[[lora]]\npath = \"x.safetensors\"\nwieght = 1\n",
        encoding="utf-8",
    )
    with pytest.raises(ProblemsError) as info:
        load_plan(path)
    text = "\n".join(info.value.problems)
    assert "unknown key `[sampler] stpes` (line 8): did you mean `steps`?" in text
    assert "did you mean `weight`?" in text and "[lora #1] wieght" in text
    assert "unknown skin type 'VII'" in text
    assert "`[classes] count`" in text and "`[sampler] scheduler`" in text
    assert len(info.value.problems) == 5


def test_plan_template_variables_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[model]\nbase = "random:sd15"\n[classes]\ndiagnoses = ["a"]\ncount = 6\n[prompt]\ntemplate = "{{ diagnosis }} {{ site }}"\n')
    with pytest.raises(ProblemsError, match="'site' is undefined"):
        load_plan(path)
    path.write_text(path.read_text() + 'vars = { site = "forearm" }\n')
    plan, name = load_plan(path)
    assert name == "p" and allocate(plan)[0].prompt == "a forearm"


def test_quotas_are_exact_for_equal_and_explicit_shares(tmp_path: Path) -> None:
    path = tmp_path / "q.toml"
    path.write_text('[model]\nbase = "random:sd15"\n[classes]\ndiagnoses = ["a", "b", "c"]\ncount = 60\n')
    plan, _ = load_plan(path)
    q = quotas(plan)
    assert sum(q.values()) == 60 and set(q.values()) == {3, 4} and len(q) == 18
    path.write_text(
        '[model]\nbase = "random:sd15"\n[classes]\ndiagnoses = ["a", "b"]\ncount = 400\n'
        "skin_types = { I = 10, II = 10, III = 15, IV = 15, V = 25, VI = 25 }\n"
    )
    plan, _ = load_plan(path)
    assert quotas(plan) == {(d, f): 2 * p for d in "ab" for f, p in zip(("I", "II", "III", "IV", "V", "VI"), (10, 10, 15, 15, 25, 25))}


def test_items_have_unique_paths_prompts_and_seeds(tmp_path: Path) -> None:
    path = tmp_path / "i.toml"
    path.write_text('[model]\nbase = "random:sd15"\n[classes]\ndiagnoses = ["Basal cell carcinoma", "nevus"]\nskin_types = "equal"\ncount = 13\n')
    plan, _ = load_plan(path)
    items = allocate(plan)
    assert [i.n for i in items] == list(range(13))
    assert len({i.path for i in items}) == 13
    assert items[0].path == "basal-cell-carcinoma/I/000000.png"
    assert items[0].prompt == "clinical dermatology photograph, Basal cell carcinoma, Fitzpatrick skin type I"
    seeds = {image_seed(plan.sampler.seed, i.n, a) for i in items for a in range(3)}
    assert len(seeds) == 39 and image_seed(0, 5, 1) == image_seed(0, 5, 1) != image_seed(1, 5, 1)


# --- the engine on the tiny pipeline -----------------------------------------------------------------------


def test_interrupted_run_finishes_with_the_same_files_as_one_run(tmp_path: Path, tiny: dict[str, Path]) -> None:
    plan = write_plan(tmp_path, tiny)
    whole = generate(plan, out=tmp_path / "whole", show_progress=False)
    assert whole.complete and whole.finished == 12 and whole.made == 12
    assert not (tmp_path / "whole" / ".staging").exists()

    part = generate(plan, out=tmp_path / "part", limit=4, show_progress=False)
    assert not part.complete and 4 <= part.finished < 12
    before = {rel: (p.stat().st_ino, p.stat().st_mtime_ns) for rel, p in pngs(tmp_path / "part").items()}
    rest = generate(plan, out=tmp_path / "part", show_progress=False)
    assert rest.complete and rest.made == 12 - part.finished
    after = pngs(tmp_path / "part")
    assert all((after[rel].stat().st_ino, after[rel].stat().st_mtime_ns) == stamp for rel, stamp in before.items())

    reference = pngs(tmp_path / "whole")
    assert sorted(after) == sorted(reference) and len(after) == 12
    for rel in reference:
        assert np.array_equal(pixels(after[rel]), pixels(reference[rel])), rel
    assert len({pixels(p).tobytes() for p in after.values()}) == 12

    rows = read_index(tmp_path / "part")
    assert sorted(r["path"] for r in rows) == sorted(after) and rows == read_index(tmp_path / "whole")
    assert [int(r["n"]) for r in rows] == list(range(12))
    for row in rows:
        record = read_record(after[row["path"]])
        assert str(record["seed"]) == row["seed"] and record["prompt"] == row["prompt"]
        assert Image.open(after[row["path"]]).text["seed"] == row["seed"]
        assert row["loras"] == "tiny_lora.safetensors@0.8" and row["scheduler"] == "dpmpp_2m"
    again = generate(plan, out=tmp_path / "part", show_progress=False)
    assert again.made == 0 and again.complete


def test_any_image_can_be_regenerated_alone(tmp_path: Path, tiny: dict[str, Path]) -> None:
    plan = write_plan(tmp_path, tiny, count=6)
    out = tmp_path / "out"
    generate(plan, out=out, show_progress=False)
    row = read_index(out)[4]
    assert np.array_equal(render_one(plan, 4, out=out), pixels(out / row["path"]))


def test_a_changed_plan_is_refused(tmp_path: Path, tiny: dict[str, Path]) -> None:
    plan = write_plan(tmp_path, tiny, count=3)
    out = tmp_path / "out"
    generate(plan, out=out, show_progress=False)
    plan.write_text(plan.read_text().replace("steps = 2", "steps = 3"))
    with pytest.raises(DermkohyaError, match=r"different plan \(changed: sampler.steps \(2 → 3\)\)"):
        generate(plan, out=out, show_progress=False)


def test_plan_json_is_a_typed_record_and_an_old_one_is_named(tmp_path: Path, tiny: dict[str, Path]) -> None:
    from dermkohya.generate import PlanRecord
    from dermkohya.records import RecordError

    plan = write_plan(tmp_path, tiny, count=3)
    out = tmp_path / "out"
    generate(plan, out=out, show_progress=False)
    record = PlanRecord.read(out / "plan.json")
    assert record.format == "dermkohya.plan/2" and record.count == 3 and record.base == str(tiny["model"])
    assert (record.base_format, record.config_dir) == ("diffusers", None)
    assert record.plan == load_plan(plan)[0] and record.loras[0].weight == 0.8
    assert sum(q.count for q in record.quotas) == 3

    old = json.loads((out / "plan.json").read_text())
    del old["format"]  # what dermkohya wrote before plan.json was a versioned record
    (out / "plan.json").write_text(json.dumps(old))
    with pytest.raises(RecordError, match=r"plan.json: written by an older dermkohya \(plan.json before dermkohya.plan/2\).*--out"):
        generate(plan, out=out, show_progress=False)


def test_duplicates_are_regenerated_recorded_and_the_same_on_two_processes(tmp_path: Path, tiny: dict[str, Path]) -> None:
    """A strict duplicate threshold forces rejections; one and two processes settle them identically."""
    plan = write_plan(tmp_path, tiny, count=12, filter="duplicate_bits = 30\nmax_attempts = 30")
    one = generate(plan, out=tmp_path / "one", show_progress=False)
    two = generate(plan, out=tmp_path / "two", processes=2, show_progress=False)
    assert one.complete and two.complete and two.processes == 2
    assert one.rejected.get("duplicate", 0) > 0 and one.rejected == two.rejected
    files_one, files_two = pngs(tmp_path / "one"), pngs(tmp_path / "two")
    assert sorted(files_one) == sorted(files_two)
    for rel in files_one:
        assert np.array_equal(pixels(files_one[rel]), pixels(files_two[rel])), rel
    rows = read_index(tmp_path / "one")
    assert sum(int(r["rejected_attempts"]) for r in rows) == sum(one.rejected.values())
    assert len(list((tmp_path / "one" / "rejected").glob("*.png"))) == sum(one.rejected.values())
    by_cell: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        by_cell.setdefault((row["diagnosis"], row["fst"]), []).append(int(read_record(files_one[row["path"]])["phash"], 16))
    for hashes in by_cell.values():
        assert all(metrics.hamming(a, b) > 30 for i, a in enumerate(hashes) for b in hashes[i + 1 :])
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["complete"] and summary["rejected"] == one.rejected


def test_an_impossible_filter_stops_with_the_image_and_reason(tmp_path: Path, tiny: dict[str, Path]) -> None:
    plan = write_plan(tmp_path, tiny, count=3, filter="min_std = 1.0\nmax_attempts = 2")
    with pytest.raises(DermkohyaError, match=r"image 0 \(melanoma, FST I\) was rejected 2 times \(blank ×2\)"):
        generate(plan, out=tmp_path / "out", show_progress=False)
    assert len(list((tmp_path / "out" / "rejected").glob("0-*.png"))) == 2


def test_a_lora_that_does_not_fit_the_base_is_refused(tmp_path: Path, tiny: dict[str, Path]) -> None:
    bad = write_kohya_lora(tiny["model"], tmp_path / "bad.safetensors", extra_module="lora_unet_down_blocks_9_attentions_0_proj_in")
    plan = write_plan(tmp_path, tiny, count=3, lora=bad)
    with pytest.raises(DermkohyaError, match=r"bad.safetensors: diffusers"):
        generate(plan, out=tmp_path / "out", show_progress=False)


def test_missing_lora_and_non_lora_files_are_named(tmp_path: Path, tiny: dict[str, Path]) -> None:
    plan = write_plan(tmp_path, tiny, count=3, lora=tmp_path / "nope.safetensors")
    with pytest.raises(ProblemsError, match="nope.safetensors not found; run `dermkohya collect RUN`"):
        generate(plan, out=tmp_path / "out", show_progress=False)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    plan = write_plan(tmp_path, tiny, count=3, lora=tmp_path / "plain.safetensors")
    with pytest.raises(DermkohyaError, match="not a kohya LoRA"):
        generate(plan, out=tmp_path / "out", show_progress=False)


def test_cli_generate_prints_a_summary(tmp_path: Path, tiny: dict[str, Path]) -> None:
    from dermkohya.cli import main

    plan = write_plan(tmp_path, tiny, count=3)
    result = CliRunner().invoke(main, ["generate", str(plan), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "3/3 images" in result.output and str(tmp_path / "out") in result.output
    bad = CliRunner().invoke(main, ["generate", str(tmp_path / "missing.toml")])
    assert bad.exit_code == 1 and "plan file not found" in bad.output


def test_benchmark_harness_runs_tiny_on_cpu(tmp_path: Path, tiny: dict[str, Path]) -> None:
    out = tmp_path / "generate.json"
    args = ["--model", str(tiny["model"]), "--random-lora", "--size", "32", "--steps", "2", "--count", "6", "--plain-count", "2",
            "--batch-sizes", "3", "--compile", "no", "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    results = load_bench().main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["plain"]["images_per_s"] > 0 and results["plain"]["batch_size"] == 1
    run = results["engine_runs"][0]
    assert "error" not in run and run["images"] == 6 and run["batch_size"] == 3 and run["steady_images_per_s"] > 0
    assert results["engine"] == run and results["speedup"] == pytest.approx(run["steady_images_per_s"] / results["plain"]["images_per_s"])
    assert len(list((tmp_path / "work" / "plain").glob("*.png"))) == 3


def test_benchmark_levers_suite_runs_tiny_on_cpu(tmp_path: Path, tiny: dict[str, Path]) -> None:
    """The one-GPU suite (bench/gpu_generate.sh) on the CPU: plain batched pipeline, the engine's call, the
    breakdown and the end-to-end generate; what needs CUDA is listed as skipped, with why."""
    out = tmp_path / "levers.json"
    args = ["--suite", "levers", "--model", str(tiny["model"]), "--lora", str(tiny["lora"]), "--size", "32", "--steps", "2", "--batch", "3",
            "--timed-batches", "1", "--e2e-count", "6", "--work", str(tmp_path / "work"), "--out", str(out)]  # fmt: skip
    results = load_bench().main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results)) and results["complete"]
    plain = results["plain_batched"]["eager"]
    assert plain["batch_size"] == 3 and plain["images"] == 3 and plain["images_per_s"] > 0
    (call,) = [v for v in results["engine_variants"] if v["name"] == "engine-eager"]
    assert call["images"] == 3 and call["images_per_s"] > 0 and not (call["fuse_qkv"] or call["channels_last"] or call["compile_vae"])
    engine = results["engine"]
    assert engine["images"] == 6 and engine["compile_mode"] is None and engine["steady_images_per_s"] > 0
    assert results["engine_vs_plain_batched"] == pytest.approx(engine["steady_images_per_s"] / plain["images_per_s"])
    assert results["engine_call_vs_plain_batched"]["eager"] == pytest.approx(call["images_per_s"] / plain["images_per_s"])
    parts = results["breakdown"]
    assert parts["unet_calls"] == 3 and parts["text_encoder_s"] > 0 and parts["vae_decode_s"] > 0 and parts["png_s"] > 0
    assert parts["text_encoder_calls"] == 0  # the prompt was encoded in the warm-up batch and is cached
    assert sum(parts["share_of_serial_batch"].values()) == pytest.approx(1.0)
    skipped = {s["name"]: s["reason"] for s in results["skipped"]}
    assert "CUDA only" in skipped["plain-reduce-overhead"] and "CUDA only" in skipped["engine-eager-no-fuse-qkv"]
    measured = {lever["lever"] for lever in results["levers"] if lever["measured"]}
    assert "host post-processing (checks, phash, PNG) off the batch loop" in measured

    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- generate-levers:begin (old) -->\nold table\n<!-- generate-levers:end -->\nafter\n")
    load_bench().main(["--table", str(out), "--readme", str(readme)])
    text = readme.read_text()
    assert "old table" not in text and text.endswith("<!-- generate-levers:end -->\nafter\n")
    assert f"| **`dermkohya generate`** (filter, hash, PNGs written) | {engine['steady_images_per_s']:.2f} | – |" in text


def test_benchmark_levers_budget_skips_what_does_not_fit() -> None:
    import argparse

    sys.path.insert(0, str(ROOT / "bench"))
    import generate_levers

    budget = generate_levers.Budget(80, batch_s=5.0, compile_s=60.0)
    assert budget.fits("eager", budget.estimate(3, 0)) and not budget.fits("compiled", budget.estimate(3, 1))
    assert budget.skipped == [{"name": "compiled", "estimate_s": 85.0, "left_s": pytest.approx(80, abs=1), "reason": "does not fit the budget"}]
    budget.learn({"batch_s": 2.0, "compile_mode": "reduce-overhead", "first_batch_s": 32.0})
    assert (budget.batch_s, budget.compile_s) == (2.0, 30.0)
    budget.learn({"batch_s": 3.0})
    assert budget.batch_s == 3.0
    saved: list[dict[str, Any]] = []
    args = argparse.Namespace(budget=0.0, batch_estimate=5.0, compile_estimate=60.0, timed_batches=2, batch=16, e2e_count=48, variants=None)
    results = generate_levers.run(Path("unused"), None, args, Path("unused"), lambda plan, name: {}, saved.append)
    assert not saved and results["plain_batched"] == {} and results["engine_variants"] == []
    assert {"plain-eager", "engine-eager", "generate-e2e"} <= {s["name"] for s in results["skipped"]}


def test_host_work_of_a_batch_overlaps_the_next_batch(tmp_path: Path, tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch's checks, hash and PNGs run on worker threads while the engine makes the next batch, and
    that next batch's work is queued before they begin (their turns at the GIL cannot delay the queuing
    while the GPU waits for it): when the first batch's images are finished, the second batch has been
    started already."""
    from dermkohya.generate import candidates
    from dermkohya.generate.engine import Engine

    starts: list[int] = []
    seen_by_first_batch: list[int] = []
    start, finish = Engine.start, candidates.finish

    def spied_start(self: Engine, slots: list[Any]) -> Any:
        pending = start(self, slots)
        starts.append(1)
        return pending

    def spied_finish(job: Any, classifier: Any, precision: str, attempt: Any, image: Any, nan: bool) -> Any:
        if attempt.item.n < 3:
            seen_by_first_batch.append(len(starts))
        return finish(job, classifier, precision, attempt, image, nan)

    monkeypatch.setattr(Engine, "start", spied_start)
    monkeypatch.setattr(candidates, "finish", spied_finish)
    result = generate(write_plan(tmp_path, tiny, count=9), out=tmp_path / "out", show_progress=False)
    assert result.complete and result.made == 9 and len(starts) == 3
    assert len(seen_by_first_batch) == 3 and min(seen_by_first_batch) >= 2
    loop = result.loop[0]
    assert loop["batches"] == 2 and 0 <= loop["waited_for_gpu_s"] <= loop["steady_s"] and loop["tail_s"] >= 0


def test_a_started_batch_must_be_finished_before_the_next(tmp_path: Path, tiny: dict[str, Path]) -> None:
    from dermkohya.generate.engine import Engine
    from dermkohya.generate.job import prepare_job

    engine = Engine(prepare_job(write_plan(tmp_path, tiny, count=3), tmp_path / "out", write=False), "cpu")
    slots = [("melanoma", 1), ("nevus", 2), ("melanoma", 3)]
    pending = engine.start(slots)
    with pytest.raises(RuntimeError, match="one batch at a time"):
        engine.start(slots)
    images, nans = engine.finish(pending)
    assert np.array_equal(images, engine(slots)[0]) and not nans.any()


def test_the_engine_gives_the_same_pixels_with_the_schedule_read_on_the_host(tmp_path: Path, tiny: dict[str, Path]) -> None:
    from dermkohya.generate.engine import Engine
    from dermkohya.generate.job import prepare_job

    plan = write_plan(tmp_path, tiny, count=3)
    plan.write_text(plan.read_text().replace("steps = 2", "steps = 4\nscheduler = \"pndm\""), encoding="utf-8")
    job = prepare_job(plan, tmp_path / "out", write=False)
    slots = [("melanoma", 1), ("nevus", 2), ("melanoma", 3)]
    guarded = Engine(job, "cpu")
    assert guarded.timesteps is not None
    plain = Engine(job, "cpu")
    plain.pipe.scheduler.set_timesteps, plain.pipe.scheduler.step = plain.timesteps._set_timesteps, plain.timesteps._step
    plain.timesteps = None
    assert np.array_equal(guarded(slots)[0], plain(slots)[0])
    assert len(guarded.timesteps.passed) == len(guarded.pipe.scheduler.timesteps) == 5  # PLMS repeats its first step


@pytest.mark.gpu
def test_compiled_engine_under_cuda_graphs_matches_eager_and_repeats(tmp_path: Path, tiny: dict[str, Path]) -> None:
    """reduce-overhead (CUDA graphs) keeps a scheduler's history of outputs right: with guidance 1 the
    pipeline hands the U-Net's own output to PNDM, which keeps it across steps (the engine clones it)."""
    from dermkohya.generate.engine import Engine
    from dermkohya.generate.job import prepare_job

    def engine(name: str, compile_: bool) -> Engine:
        plan = write_plan(tmp_path, tiny, name=name, count=3)
        text = plan.read_text().replace("steps = 2", "steps = 6\nscheduler = \"pndm\"\nguidance = 1.0")
        plan.write_text(text.replace("batch_size = 3", f"batch_size = 3\ncompile = {str(compile_).lower()}\nprecision = \"fp32\""))
        return Engine(prepare_job(plan, tmp_path / name, write=False), "cuda")

    slots = [("melanoma", 1), ("nevus", 2), ("melanoma", 3)]
    eager = engine("eager", False)(slots)[0].astype(int)
    compiled = engine("graphs", True)
    first, again = compiled(slots)[0], compiled(slots)[0]
    assert np.array_equal(first, again)
    diff = np.abs(first.astype(int) - eager)
    assert diff.mean() < 1.0 and diff.max() <= 8, (diff.mean(), diff.max())


# --- the done-when: smoke model + a LoRA kohya trained, killed halfway, rerun -----------------------


@pytest.fixture
def kohya_lora(kohya_run: Path) -> Path:  # noqa: F811
    """The LoRA kohya's train_network.py wrote (two steps on the smoke model), shared with collect's tests."""
    return kohya_run / "output" / RUN / f"{RUN}.safetensors"


DEMO_PLAN = """\
name = "done-when"
[model]
base = "random:sd15"
[[lora]]
path = "{lora}"
weight = 1.0
[classes]
diagnoses = ["melanoma", "psoriasis", "basal cell carcinoma"]
skin_types = "equal"
count = 60
[sampler]
steps = 2
width = 64
height = 64
seed = 3
[engine]
batch_size = 6
"""


@pytest.mark.kohya
@pytest.mark.slow
def test_done_when_60_images_killed_halfway_and_rerun(tmp_path: Path, kohya_lora: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link_smoke_model(tmp_path)  # random:sd15 is the project's models/smoke/, for train and generate alike
    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "done-when.toml"
    plan.write_text(DEMO_PLAN.format(lora=kohya_lora), encoding="utf-8")
    out = tmp_path / "synthetic" / "done-when"
    command = [sys.executable, "-c", "from dermkohya.cli import main; main()", "generate", str(plan), "--out", str(out), "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 1200
    while len(list((out / ".staging").glob("*-*.png"))) + len(pngs(out)) < 30:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(pngs(out)) < 60
    finished = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    files = pngs(out)
    assert len(files) == 60
    digests = {hashlib.sha256(pixels(p).tobytes()).hexdigest() for p in files.values()}
    assert len(digests) == 60
    rows = read_index(out)
    assert sorted(r["path"] for r in rows) == sorted(files) and len(rows) == 60
    cells = {(r["diagnosis"], r["fst"]) for r in rows}
    assert len(cells) == 18 and {r["lora_sha256"] for r in rows} == {hashlib.sha256(kohya_lora.read_bytes()).hexdigest()}
    for n in (0, 31, 59):
        assert np.array_equal(render_one(plan, n, out=out), pixels(out / rows[n]["path"])), n


def test_committed_plans_are_valid() -> None:
    plans = sorted((ROOT / "plans").glob("*.toml"))
    assert plans
    for path in plans:
        plan, name = load_plan(path)
        assert name == path.stem and sum(quotas(plan).values()) == plan.classes.count


def test_an_images_record_is_read_without_decoding_its_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settling reads every finished image's record: from the text chunk png_bytes writes before the image
    data, without decoding the pixels; a file whose chunk comes after the data (rewritten by another
    tool) is still read, by decoding it."""
    import struct
    import zlib

    from PIL import PngImagePlugin

    from dermkohya.generate.output import png_bytes

    record = {"prompt": "melanoma", "negative_prompt": "", "steps": 2, "scheduler": "pndm", "guidance": 7.5, "seed": 3,
              "width": 8, "height": 8, "loras": [], "n": 0}  # fmt: skip
    data = png_bytes(np.zeros((8, 8, 3), dtype=np.uint8), record)
    (tmp_path / "a.png").write_bytes(data)
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append(data[at : at + 12 + length])
        at += 12 + length
    ours = next(c for c in chunks if c[4:8] in (b"tEXt", b"iTXt") and b"dermkohya\x00" in c[8:20])
    rest = [c for c in chunks if c is not ours]
    moved = data[:8] + b"".join(rest[:-1]) + ours + rest[-1]  # just before IEND
    assert zlib.crc32(ours[4:-4]) == struct.unpack(">I", ours[-4:])[0]
    (tmp_path / "b.png").write_bytes(moved)

    assert read_record(tmp_path / "b.png") == record
    load = PngImagePlugin.PngImageFile.load

    def no_decoding(self: Any) -> Any:
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    assert read_record(tmp_path / "a.png") == record
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", load)
