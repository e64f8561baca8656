"""A real two-step kohya run on the offline smoke model, shared by the `kohya` tests of collect and merge.

It lays out a project as `dermkohya train` leaves it: output/smoke/ with kohya's final and per-step
LoRAs, a sample image, and manifest.json (the manifest keys collect relies on). Built once per pytest
session (cached under the session's base temp folder) because kohya takes about a minute on a CPU.
"""

from __future__ import annotations

import subprocess
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dermkohya import basemodel, dataset, kohya
from dermkohya.manifests import LaunchManifest

RUN = "smoke"
PROMPT = "clinical dermatology photograph, psoriasis, Fitzpatrick skin type III"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def train_two_steps(root: Path) -> Path:
    model_dir, tokenizers = basemodel.ensure_smoke_model("sd15")
    data = root / "data" / "1_lesion"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(PROMPT, encoding="utf-8")
    prompts = root / "sample_prompts.txt"
    prompts.write_text(f"{PROMPT} --w 64 --h 64 --s 2 --l 7 --d 1\n", encoding="utf-8")
    out = root / "output" / RUN
    sd_scripts = kohya.find_sd_scripts()
    argv = [
        str(kohya.find_python()), "-m", "accelerate.commands.launch", "--num_cpu_threads_per_process", "2",
        "train_network.py", "--pretrained_model_name_or_path", str(model_dir), "--tokenizer_cache_dir", str(tokenizers),
        "--train_data_dir", str(root / "data"), "--resolution", "64", "--network_module", "networks.lora",
        "--network_dim", "16", "--network_alpha", "16", "--train_batch_size", "1", "--max_train_steps", "2",
        "--sdpa", "--mixed_precision", "no", "--output_dir", str(out), "--output_name", RUN,
        "--caption_extension", ".txt", "--save_model_as", "safetensors", "--save_every_n_steps", "1",
        "--sample_every_n_steps", "2", "--sample_prompts", str(prompts), "--sample_sampler", "euler_a", "--seed", "0",
    ]  # fmt: skip
    started = _now()
    result = subprocess.run(argv, cwd=sd_scripts, env=kohya.kohya_env(), capture_output=True, text=True)
    (root / "train.log").write_text(result.stdout + result.stderr, encoding="utf-8")
    assert result.returncode == 0 and (out / f"{RUN}.safetensors").is_file(), (result.stdout + result.stderr)[-3000:]
    manifest = LaunchManifest.model_validate({  # as `dermkohya train` writes it, through its record
        "run_name": RUN,
        "run_file": f"runs/{RUN}.toml",
        "run_file_sha256": "0" * 64,
        "spec": {"description": "two kohya steps on the smoke model"},
        "dermkohya_version": "test",
        "family": "sd15",
        "script": "train_network.py",
        "network": {"module": "networks.lora", "dim": 16, "alpha": 16.0},
        "train": {"learning_rate": 1e-4, "batch_size": 1, "max_steps": 2, "mixed_precision": "no", "resolution": 64},
        "sd_scripts": {"path": str(sd_scripts), "commit": kohya.sd_scripts_commit(sd_scripts), "pinned_commit": kohya.PINNED_COMMIT},
        "base_model": {"spec": "random:sd15", "path": str(model_dir), "expected_sha256": None,
                       "sha256": basemodel.sha256_path(model_dir), "verified": False, "smoke": True},
        "dataset": {"train_data_dir": "data", "prepared": None, "content_hash": dataset.content_hash(root / "data"),
                    "counts": {"psoriasis": {"III": 4}}, "images": 4, "effective_samples": 4, "effective_counts": None,
                    "caption_template": PROMPT, "skin_types": ["III"]},  # fmt: skip
        "sample_prompts": [PROMPT],
        "rendered_sha256": {},
        "launch_args": argv[1:5],
        "script_args": argv[6:],
        "command": argv,
        "started": started,
        "finished": _now(),
        "exit_code": 0,
    })
    manifest.write(out / "manifest.json")
    return root


@pytest.fixture(scope="session")
def kohya_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project folder of one real kohya run (trained at most once per session)."""
    root = tmp_path_factory.getbasetemp() / "kohya-run"
    done = root / "DONE"
    if not done.exists():
        if root.exists():
            raise RuntimeError(f"{root}: an earlier kohya run in this session failed")
        root.mkdir()
        train_two_steps(root)
        done.touch()
    return root
