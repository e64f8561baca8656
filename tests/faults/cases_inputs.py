"""Inputs: run files, run names, captions and prompts, datasets, base checkpoints, plans, evaluate's inputs."""

from __future__ import annotations

import os
import zipfile

from .project import RUN, Project, refused, succeeded
from .registry import case

A = "inputs"


def _run(project: Project, text: str | bytes, name: str = "tiny") -> str:
    project.write(f"runs/{name}.toml", text)
    project.freeze()
    return f"runs/{name}.toml"


@case("runfile-wrong-type", A, "a run file value of the wrong type (`batch_size = \"four\"`)",
      "refuses: names `[train] batch_size`, its line and the value; exit 1")
def _(project: Project) -> None:
    run = _run(project, RUN.replace('mixed_precision = "no"', 'mixed_precision = "no"\nbatch_size = "four"'))
    refused(project.cli("render", run), "runs/tiny.toml", "`[train] batch_size` (line 11)", "'four'", code=1)


@case("runfile-typo-key", A, "a typo'd key in a run file (`learnig_rate`)",
      "refuses: names the key, its line and the nearest valid key (`learning_rate`)")
def _(project: Project) -> None:
    run = _run(project, RUN.replace("epochs = 2", "epochs = 2\nlearnig_rate = 1e-4"))
    refused(project.cli("render", run), "runs/tiny.toml", "unknown key `[train] learnig_rate` (line 12)", "did you mean `learning_rate`?")


@case("runfile-missing-section", A, "a run file without its [dataset] section",
      "refuses: `missing key dataset: add it to the run file`")
def _(project: Project) -> None:
    run = _run(project, RUN.replace('[dataset]\ntrain_data_dir = "data"\n', ""))
    refused(project.cli("render", run), "runs/tiny.toml", "missing key `dataset`: add it to the run file")


@case("runfile-duplicate-key", A, "a key given twice in a run file",
      "refuses: not valid TOML, with the line, and says to fix the syntax there")
def _(project: Project) -> None:
    run = _run(project, RUN.replace("epochs = 2", "epochs = 2\nepochs = 3"))
    refused(project.cli("render", run), "runs/tiny.toml: not valid TOML", "line 12", "fix the syntax at that line")


@case("runfile-bom", A, "a run file saved with a UTF-8 byte-order mark (Windows editors)",
      "works: the mark is ignored and the run renders")
def _(project: Project) -> None:
    run = _run(project, "\ufeff" + RUN)
    succeeded(project.cli("render", run), "tiny: rendered")


@case("runfile-crlf", A, "a run file with CRLF line ends", "works: renders the same kohya files as with LF")
def _(project: Project) -> None:
    succeeded(project.cli("render", "runs/tiny.toml"))
    lf = (project.root / "runs/tiny/config.toml").read_text()
    run = _run(project, RUN.replace("\n", "\r\n"), name="crlf")
    succeeded(project.cli("render", run), "crlf: rendered")
    assert (project.root / "runs/crlf/config.toml").read_text() == lf.replace("tiny", "crlf")


@case("runfile-not-utf8", A, "a run file that is not UTF-8 (a Latin-1 `é`)",
      "refuses: names the file, the line and says to save it as UTF-8; no traceback")
def _(project: Project) -> None:
    run = _run(project, ('description = "eczéma"\n' + RUN).encode("latin-1"))
    refused(project.cli("render", run, process=True), "runs/tiny.toml", "not UTF-8", "line 1", "save it as UTF-8")


@case("run-name-unsafe", A, "a run `name` with `..`, `/`, a space or non-ASCII letters",
      "refuses each: names the `name` key, its line and the allowed characters, before any path is built from it")
def _(project: Project) -> None:
    project.freeze()
    for name in ("../../etc", "a/b", "my run", "eczéma"):
        project.write("runs/named.toml", f'name = "{name}"\n' + RUN)
        refused(project.cli("render", "runs/named.toml"), "runs/named.toml", "`name` (line 1)", "[A-Za-z0-9._-]", code=1)
        assert not (project.root.parent / "etc").exists() and not (project.root / "output").exists()
    os.remove(project.root / "runs/named.toml")


@case("run-file-name-spaces", A, "a run file whose file name has a space (`runs/my run.toml`)",
      "refuses: the run name comes from the file name, so it says to set `name` in the file")
def _(project: Project) -> None:
    run = _run(project, RUN, name="my run")
    refused(project.cli("render", run), "runs/my run.toml", "run name 'my run' must be letters, digits", "set `name`")


@case("prompt-option-separator", A, "a sample prompt containing ` --` (kohya's prompt option separator) or a newline",
      "refuses: names the prompt and says kohya would read it as an option")
def _(project: Project) -> None:
    run = _run(project, RUN + '[sample]\nprompts = ["plaque -- 2 cm, --n blurry"]\n')
    refused(project.cli("render", run), "[sample] prompt 'plaque -- 2 cm, --n blurry' contains `--`", "remove it")


@case("prompt-shell-characters", A, "prompts and captions with `$(…)`, backticks and quotes",
      "works: passed to kohya verbatim in files, never through a shell; nothing runs")
def _(project: Project) -> None:
    text = "plaque $(touch PWNED) `touch PWNED2` \\\"quoted\\\" 'single'"
    for n in (0, 1):
        project.write(f"data/1_derm/{n}.txt", "clinical photograph, $(touch PWNED) `touch PWNED2` \"q\" 'q'")
    run = _run(project, RUN + f'[sample]\nprompts = ["{text}"]\n')
    succeeded(project.cli("render", run), "tiny: rendered")
    prompts = (project.root / "runs/tiny/sample_prompts.txt").read_text()
    assert "plaque $(touch PWNED) `touch PWNED2` \"quoted\" 'single' --w 64" in prompts
    assert not list(project.root.rglob("PWNED*")) and not list(project.tmp.glob("PWNED*"))


@case("caption-multiline", A, "a caption file with a newline in the caption (kohya reads its first line only)",
      "warns: names the caption file and says kohya uses the first line; `check --strict` refuses")
def _(project: Project) -> None:
    project.write("data/1_derm/1.txt", "clinical dermatology photograph,\nplaque psoriasis")
    project.freeze()
    succeeded(project.cli("check", "data", "--resolution", "64"), "caption-multiline", "1_derm/1.txt", "kohya uses the first")
    refused(project.cli("check", "data", "--resolution", "64", "--strict"), "caption-multiline", "1_derm/1.txt")


@case("dataset-symlink-loop", A, "a symlink loop in a dataset (`data/1_derm/loop -> ..`), or as the [dataset] folder itself",
      "the check ends (no endless walk) and reports the link as a nested folder kohya does not read; a looping "
      "[dataset] path is refused as not found, naming the run file's key; exit 1")
def _(project: Project) -> None:
    os.symlink("..", project.root / "data/1_derm/loop")
    os.symlink("loopy", project.root / "loopy")
    project.write("runs/loopy.toml", RUN.replace('train_data_dir = "data"', 'train_data_dir = "loopy"'))
    project.freeze()
    refused(project.cli("check", "data", "--resolution", "64", timeout=60), "nested-folder", "1_derm/loop", code=1)
    refused(project.cli("render", "runs/loopy.toml"), "loopy not found (run file [dataset] = 'loopy')", "fix the path", code=1)


@case("base-zero-bytes", A, "a `.safetensors` base of zero bytes",
      "refuses before launch: names the file, says it has 0 bytes (truncated) and to re-download it")
def _(project: Project) -> None:
    project.write("models/base.safetensors", b"")
    project.freeze()
    refused(project.cli("render", "runs/tiny.toml"), "models/base.safetensors: not a valid safetensors file",
            "only 0 bytes", "re-download or re-export it", code=1)


@case("base-truncated", A, "a `.safetensors` base cut short (an interrupted download)",
      "refuses before launch: names the file, says its header is cut short and to re-download it")
def _(project: Project) -> None:
    data = (project.root / "models/base.safetensors").read_bytes()
    project.write("models/base.safetensors", data[: len(data) // 2])
    project.freeze()
    refused(project.cli("render", "runs/tiny.toml"), "models/base.safetensors: not a valid safetensors file",
            "exceeds the file", "re-download or re-export it", code=1)


@case("base-renamed-ckpt", A, "a pickled `.ckpt` renamed to `.safetensors`",
      "refuses before launch: names the file, says it is a pickle with a .safetensors name: rename it .ckpt or convert it")
def _(project: Project) -> None:
    path = project.root / "models/base.safetensors"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    project.freeze()
    refused(project.cli("render", "runs/tiny.toml"), "models/base.safetensors: not a valid safetensors file",
            "it is a pickle (a .ckpt or torch.save file)", "give it its .ckpt name, or convert it", code=1)


def _plan(project: Project, body: str) -> str:
    project.write("plans/p.toml", '[model]\nbase = "models/base.safetensors"\n' + body)
    project.freeze()
    return "plans/p.toml"


@case("plan-invalid-values", A, "a generation plan with count 0, a negative diagnosis share and an unknown scheduler",
      "refuses with every problem at once, each naming its key and line; nothing generated")
def _(project: Project) -> None:
    plan = _plan(project, '[classes]\ndiagnoses = {melanoma = -1, psoriasis = 2}\ncount = 0\n[sampler]\nscheduler = "nonsense"\n')
    ran = project.cli("generate", plan)
    refused(ran, "plans/p.toml: 3 problem(s)", "share of diagnosis 'melanoma' must be a positive number",
            "`[classes] count` (line 5)", "`[sampler] scheduler` (line 7)", "'dpmpp_2m'")
    assert not (project.root / "synthetic/p").exists()


@case("plan-lora-wrong-family", A, "a plan that applies an SDXL LoRA to an SD 1.5 base",
      "refuses before any model loads: names the [[lora]] entry, both families and the fix")
def _(project: Project) -> None:
    from safetensors.numpy import load_file, save_file

    from _lora_fixture import kohya_metadata

    tensors = load_file(str(project.lora))
    metadata = kohya_metadata(rank=4, alpha=4.0) | {"ss_base_model_version": "sdxl_base_v1-0",
                                                    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    save_file(tensors, str(project.root / "models/xl_lora.safetensors"), metadata)
    plan = _plan(project, '[[lora]]\npath = "models/xl_lora.safetensors"\n[classes]\ndiagnoses = ["melanoma"]\ncount = 6\n')
    refused(project.cli("generate", plan), "[[lora]] #1 path: models/xl_lora.safetensors is an sdxl LoRA",
            "is sd15", "use a LoRA trained on an sd15 base")
    assert not (project.root / "synthetic/p").exists() and not (project.root / "models/configs").exists()


@case("evaluate-empty-synthetic", A, "`evaluate` on a synthetic folder with nothing generated in it",
      "refuses: names the folder and says to run `dermkohya generate` first; no report written")
def _(project: Project) -> None:
    (project.root / "synthetic/empty").mkdir(parents=True)
    project.write("heldout/metadata.csv", "image,diagnosis,fitzpatrick\na.png,melanoma,II\n")
    project.write("heldout/a.png", (project.root / "data/1_derm/0.png").read_bytes())
    project.freeze()
    ran = project.cli("evaluate", "--real", "heldout", "--synthetic", "synthetic/empty", "--skip", "fid,lpips,clip,memorisation")
    refused(ran, "synthetic/empty: no index.csv", "dermkohya generate", code=1)
    project.write("synthetic/empty/index.csv", "path,diagnosis,fst,prompt\n")
    refused(project.cli("evaluate", "--real", "heldout", "--synthetic", "synthetic/empty", "--skip", "fid,lpips,clip,memorisation"),
            "index.csv: lists no images; run `dermkohya generate` first")
    assert not (project.root / "reports").exists()


@case("caption-not-utf8", A, "a caption file that is not UTF-8 (kohya stops with UnicodeDecodeError)",
      "`train` refuses before launch: names the caption file and the byte; kohya never starts")
def _(project: Project) -> None:
    project.write("data/1_derm/1.txt", "ecz\xe9ma".encode("latin-1"))
    project.freeze()
    refused(project.cli("train", "runs/tiny.toml"), "1_derm/1.txt", "not UTF-8", code=1)
    assert not (project.root / "output/tiny").exists()


@case("caption-missing", A, "an image without a caption file (kohya would silently use the folder's class token)",
      "`train` refuses before launch: names the image and says to write its caption")
def _(project: Project) -> None:
    os.remove(project.root / "data/1_derm/1.txt")
    project.freeze()
    refused(project.cli("train", "runs/tiny.toml"), "1_derm/1.png", code=1)
    assert not (project.root / "output/tiny").exists()


@case("base-missing", A, "a run file whose [model] base does not exist",
      "refuses: names the path and says to put the checkpoint there or fix the run file")
def _(project: Project) -> None:
    os.remove(project.root / "models/base.safetensors")
    project.freeze()
    refused(project.cli("train", "runs/tiny.toml"), "models/base.safetensors", code=1)
    assert not (project.root / "output/tiny").exists()
