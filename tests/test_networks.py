"""dermkohya.networks.lora_fast against sd-scripts' own networks.lora, in kohya's environment.

The check runs as kohya runs a network module: kohya's Python, from the sd-scripts folder, with the
project root on PYTHONPATH (what `kohya.kohya_env` adds). The CUDA-graph path needs a GPU; here the
fused layers, the eager fallback, the saved file and the options are compared.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from dermkohya import kohya

CHECK = Path(__file__).with_name("_networks_check.py")


@pytest.fixture(scope="module")
def result() -> dict:
    env = kohya.kohya_env()
    root = str(Path(__file__).resolve().parent.parent)  # what kohya_env adds in a source tree, explicitly
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    out = subprocess.run([str(kohya.find_python()), str(CHECK)], cwd=kohya.find_sd_scripts(), env=env,
                         capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("NETWORKS-CHECK ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("NETWORKS-CHECK "))


@pytest.mark.kohya
@pytest.mark.parametrize("case", ["linear_conv1x1", "conv3x3", "dropout_falls_back"])
def test_fused_layers_match_kohya_exactly_in_fp32(result: dict, case: str) -> None:
    r = result[case]
    assert r["fused"] == r["modules"] > 0
    assert r["out_diff"] <= 1e-5 * r["out_scale"]
    assert r["grad_diff"] <= 1e-5 * r["grad_scale"]
    assert r["same_keys"] and r["same_shapes"]
    assert not r["graphs_installed"]  # a toy U-Net is not a verified class: auto leaves graphs off


@pytest.mark.kohya
def test_conv3x3_lora_is_covered(result: dict) -> None:
    assert result["conv3x3"]["conv3x3"] == 1


@pytest.mark.kohya
def test_fused_layers_match_kohya_under_autocast_within_rounding(result: dict) -> None:
    r = result["autocast_bf16"]
    assert r["out_diff"] <= 2e-2 * r["out_scale"]  # bf16 keeps ~3 significant digits
    assert r["grad_diff"] <= 2e-2 * r["grad_scale"]


@pytest.mark.kohya
def test_saved_file_is_a_networks_lora_file(result: dict) -> None:
    files = result["files"]
    assert files["fast"]["tensors"] == files["kohya"]["tensors"]
    meta_k, meta_f = files["kohya"]["metadata"], files["fast"]["metadata"]
    assert meta_f["ss_network_module"] == "networks.lora"
    assert meta_f["dermkohya.trained_with"] == "dermkohya.networks.lora_fast"
    assert set(meta_f) - set(meta_k) == {"dermkohya.trained_with"}
    assert {k: v for k, v in meta_f.items() if k not in ("ss_network_module", "dermkohya.trained_with")} == {
        k: v for k, v in meta_k.items() if k != "ss_network_module"
    }
    assert files["reloads_in_kohya"] and files["from_weights_adopted"] == "FastLoRANetwork"
    assert files["metadata_arg_untouched"]  # kohya's metadata dict is reused for later saves


@pytest.mark.kohya
def test_bad_options_name_the_argument(result: dict) -> None:
    errors = result["option_errors"]
    assert len(errors) == 3
    assert "cuda_graph" in errors[0] and all("max_graphs" in e for e in errors[1:])


@pytest.mark.kohya
def test_graph_dispatcher_runs_eagerly_without_cuda(result: dict) -> None:
    r = result["cpu_dispatch"]
    assert not r["installed"]  # no CUDA: nothing replaces the U-Net's forward
    assert r["eager_calls"] == 1 and r["replays"] == 0 and r["off_reason"] is None
    assert r["out_diff"] == 0.0 and r["dispatch_diff"] == 0.0


@pytest.mark.kohya
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fp32", "fp16", "bf16", "fp32_grads_zeroed_in_place"])
def test_graph_replay_trains_like_the_eager_path(result: dict, case: str) -> None:
    """Six optimizer steps replayed from CUDA graphs land on the eager path's outputs, gradients and weights."""
    r = result["cuda_graphs"][case]
    print(json.dumps({"case": case, **r}))  # the measured figures, in the test log
    if case == "fp32_grads_zeroed_in_place":  # graphs would count the gradient twice: eager from the 2nd step
        assert r["off_reason"].startswith("gradients still set") and r["replays"] == 1
    else:
        assert r["off_reason"] is None and r["replays"] == 6 and r["eager_replays"] == 0
    tolerance = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}[case.split("_")[0]]
    assert r["out_diff"] <= tolerance * r["out_scale"]
    assert max(r["grad_diffs"]) <= tolerance * r["grad_scale"]
    assert r["weights_moved"] > 10 * r["weight_diff"]  # training moved the weights far more than the paths differ
    assert r["weight_diff"] <= tolerance * r["weight_scale"]
    assert all(abs(a - b) <= tolerance * max(abs(b), 1e-8) for a, b in zip(r["loss_on"], r["loss_off"]))
