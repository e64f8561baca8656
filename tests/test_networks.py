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
    # save_copy=background wrote on its writer thread, batched in the caller: both kohya's file, byte for byte
    # (kohya's own hashes of the tensor bytes), and no partial file or writing folder left
    assert files["background_written_by"] == "dermkohya-lora-save"
    assert files["fast_batched"]["metadata"] == meta_f and files["fast_batched"]["tensors"] == files["fast"]["tensors"]
    assert files["nothing_left_beside"] == ["fast.safetensors", "fast_batched.safetensors", "kohya.safetensors"]
    assert files["uploads_save_in_the_caller"] == "batched"  # kohya uploads right after save_weights returns


@pytest.mark.kohya
@pytest.mark.gpu
def test_saved_file_from_the_gpu_is_kohyas_bytes(result: dict) -> None:
    """save_copy=background (the default) and batched: one host transfer per dtype, and the same tensors as kohya's
    tensor-by-tensor copies: kohya's own hashes of the tensor bytes agree."""
    files = result["files_cuda"]
    meta_k = files["kohya"]["metadata"]
    for name in ("fast", "fast_batched"):
        meta_f = files[name]["metadata"]
        assert meta_f["sshs_model_hash"] == meta_k["sshs_model_hash"] and meta_f["sshs_legacy_hash"] == meta_k["sshs_legacy_hash"]
        assert files[name]["tensors"] == files["kohya"]["tensors"]


@pytest.mark.kohya
def test_bad_options_name_the_argument(result: dict) -> None:
    errors = result["option_errors"]
    assert len(errors) == 9
    assert "cuda_graph" in errors[0] and all("max_graphs" in e for e in errors[1:3])
    assert "grad_sync='sometimes'" in errors[3] and "bucket, kohya" in errors[3]
    assert "sdpa='flash'" in errors[4] and "auto, cudnn" in errors[4]
    assert "conv_benchmark='maybe'" in errors[5] and "on or off" in errors[5]
    assert "save_copy='fast'" in errors[6] and "background, batched, kohya" in errors[6]
    assert "channels_last='yes'" in errors[7] and "on or off" in errors[7]
    assert "norms='fp32'" in errors[8] and "half, autocast" in errors[8]


@pytest.mark.kohya
def test_graph_dispatcher_runs_eagerly_without_cuda(result: dict) -> None:
    r = result["cpu_dispatch"]
    assert not r["installed"]  # no CUDA: nothing replaces the U-Net's forward
    assert r["eager_calls"] == 1 and r["replays"] == 0 and r["off_reason"] is None
    assert r["out_diff"] == 0.0 and r["dispatch_diff"] == 0.0


@pytest.mark.kohya
def test_text_encoder_graphs_run_eagerly_without_cuda_and_split_sdxls_two_encoders(result: dict) -> None:
    r = result["te_dispatch"]
    assert r["eager_calls"] == 1 and r["replays"] == 0 and r["eager_diff"] == 0.0
    assert r["accepts"] == {"none": True, "sdxl": True, "tuple": True, "attention_mask": False, "output_attentions": False}
    assert r["split"] == [["te1"], ["te2"]]  # each encoder graphs its own LoRA layers, all of them
    assert sum(r["split_sizes"]) == r["te_loras"] and min(r["split_sizes"]) > 0


@pytest.mark.kohya
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fp32", "fp16", "bf16", "fp16_flat_weights"])
def test_sdxl_text_encoder_keyword_calls_replay_like_the_eager_path(result: dict, case: str) -> None:
    """kohya's SDXL calls (output_hidden_states=True, return_dict=True) replayed from graphs: transformers' output
    objects, every hidden state, and six steps of training landing where the eager path does."""
    r = result["sdxl_te_graphs"][case]
    print(json.dumps({"case": case, **r}))
    assert r["te_replays"] == [6, 6] and r["te_off"] == [None, None]
    assert r["te_flat"] == [case.endswith("flat_weights")] * 2
    assert r["types"] == r["types_eager"] == ["BaseModelOutputWithPooling", "CLIPTextModelOutput"]
    assert r["hidden_states"] == r["hidden_states_eager"] == [4, 4]
    # te1's last layer feeds only outputs the loss does not read: no gradient eagerly, a zero one from the graphs
    unused = r["unused_eager"]
    assert unused and all(name.startswith("lora_te1_text_model_encoder_layers_2_") for name in unused)
    assert r["unused_graphs"] in ([], unused) and sorted(r["te_zero_grads"]) == unused
    tolerance = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}[case.split("_")[0]]
    assert r["out_diff"] <= tolerance * r["out_scale"]
    assert max(r["grad_diffs"]) <= tolerance * r["grad_scale"]
    assert r["weight_diff"] <= tolerance * r["weight_scale"]
    assert all(abs(a - b) <= tolerance * max(abs(b), 1e-8) for a, b in zip(r["loss_on"], r["loss_off"]))


@pytest.mark.kohya
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fp32", "fp16", "bf16", "fp32_grads_zeroed_in_place", "fp16_cudnn_kernels",
                                  "fp32_flat_weights", "fp16_flat_weights", "bf16_flat_weights",
                                  "fp16_flat_weights_grads_zeroed_in_place"])
def test_graph_replay_trains_like_the_eager_path(result: dict, case: str) -> None:
    """Six optimizer steps replayed from CUDA graphs land on the eager path's outputs, gradients and weights;
    with flat_weights (a network prepared as kohya's trainer does) through one weight input per graph."""
    r = result["cuda_graphs"][case]
    print(json.dumps({"case": case, **r}))  # the measured figures, in the test log
    flat = "flat_weights" in case
    assert r["flat"] is flat and r["te_flat"] is flat
    if flat and "zeroed" not in case:  # every gradient a view of the graph's one gradient buffer
        assert r["grad_storages"] == 2  # the U-Net's graph and the text encoder's
    if "zeroed_in_place" in case:  # graphs would count the gradient twice: eager from the 2nd step
        assert r["off_reason"].startswith("gradients still set") and r["replays"] == 1
    else:
        assert r["off_reason"] is None and r["replays"] == 6 and r["eager_replays"] == 0
        assert r["te_off_reason"] is None and r["te_replays"] == 6  # the text encoder's graphs replayed too
    tolerance = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}[case.split("_")[0]]
    assert r["out_diff"] <= tolerance * r["out_scale"]
    assert max(r["grad_diffs"]) <= tolerance * r["grad_scale"]
    assert r["weights_moved"] > 10 * r["weight_diff"]  # training moved the weights far more than the paths differ
    assert r["weight_diff"] <= tolerance * r["weight_scale"]
    assert all(abs(a - b) <= tolerance * max(abs(b), 1e-8) for a, b in zip(r["loss_on"], r["loss_off"]))


# --- gradient sync over processes (dermkohya.networks.grad_sync; issue #18) ----------------------------

DDP_HARNESS = Path(__file__).resolve().parent.parent / "bench" / "ddp_graphs.py"


def _sync_rank(rank: int, store: str, out: str) -> None:
    """One of 2 gloo processes: kohya's per-tensor mean (accelerate's reduce: clone, all_reduce, divide)
    against all_reduce_grads, on fp32 and fp64 gradients and one parameter without a gradient."""
    import torch
    import torch.distributed as dist

    from dermkohya.networks import grad_sync

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    shapes = [((3, 4), torch.float32), ((5,), torch.float64), ((2, 2, 3, 3), torch.float32), ((7,), torch.float32)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in shapes]
    for p in params[:3]:
        p.grad = torch.randn(p.shape, dtype=p.dtype) * (rank + 1)
    kohya_mean = []
    for p in params[:3]:
        reduced = p.grad.clone()
        dist.all_reduce(reduced)
        reduced /= 2
        kohya_mean.append(reduced)
    collectives = grad_sync.all_reduce_grads(params, 2)
    fp32 = [p for p in params[:3] if p.dtype == torch.float32]
    result = {
        "collectives": collectives,
        "equal": [torch.equal(p.grad, ref) for p, ref in zip(params[:3], kohya_mean)],
        "dtypes_kept": [p.grad.dtype == p.dtype for p in params[:3]],
        "none_kept": params[3].grad is None,
        "fp32_one_buffer": fp32[0].grad.untyped_storage().data_ptr() == fp32[1].grad.untyped_storage().data_ptr(),
    }
    if rank == 0:
        Path(out).write_text(json.dumps(result), encoding="utf-8")
    dist.destroy_process_group()


def test_grad_sync_is_kohyas_per_tensor_mean_bit_for_bit_over_two_processes(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "rank0.json"
    mp.spawn(_sync_rank, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    r = json.loads(out.read_text(encoding="utf-8"))
    assert r["collectives"] == 2  # one per dtype, not one per tensor
    assert all(r["equal"]) and all(r["dtypes_kept"]) and r["none_kept"] and r["fp32_one_buffer"]


def test_grad_sync_with_one_process_leaves_the_gradients_as_they_are() -> None:
    import torch

    from dermkohya.networks import grad_sync

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = grad = torch.full((3,), 2.0)
    assert grad_sync.all_reduce_grads([p], 1) == 0 and p.grad is grad


class _Accelerator:
    num_processes = 1

    def unwrap_model(self, model: object) -> object:
        return model


class _Trainer:
    def __init__(self) -> None:
        self.kohya_calls = 0

    def all_reduce_network(self, accelerator: object, network: object) -> None:
        self.kohya_calls += 1

    def train(self, network: object) -> object:  # kohya's train() calls network.prepare_network(args)
        return network.prepare_network()


class _Ours:
    def prepare_network(self) -> object:
        from dermkohya.networks import grad_sync

        return grad_sync.calling_trainer()


def test_grad_sync_installs_on_the_calling_trainer_for_its_network_type_only() -> None:
    import torch

    from dermkohya.networks import grad_sync

    trainer = _Trainer()
    assert trainer.train(_Ours()) is trainer  # found through the frame of kohya's method
    assert _Ours().prepare_network() is None  # not called from a trainer: nothing to install on
    assert grad_sync.install(trainer, _Ours) and grad_sync.install(trainer, _Ours)
    installed = trainer.all_reduce_network
    assert getattr(installed, grad_sync.MARK)
    trainer.all_reduce_network(_Accelerator(), torch.nn.Linear(2, 2))  # another network: kohya's method
    assert trainer.kohya_calls == 1
    ours = _Ours()
    ours.parameters = lambda: iter(())  # type: ignore[attr-defined]
    trainer.all_reduce_network(_Accelerator(), ours)
    assert trainer.kohya_calls == 1 and trainer.all_reduce_network is installed  # installed once
    assert not grad_sync.install(object(), _Ours)  # no all_reduce_network: left alone


def _ddp_check(tmp_path: Path, *extra: str) -> dict:
    env = kohya.kohya_env()
    root = str(DDP_HARNESS.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    env["SD_SCRIPTS_DIR"] = str(kohya.find_sd_scripts())
    out = tmp_path / "ddp.json"
    done = subprocess.run([str(kohya.find_python()), str(DDP_HARNESS), "--out", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=600)
    assert out.is_file(), done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))["check"]
    assert done.returncode == 0 and report["ok"], report.get("error") or done.stderr[-3000:]
    return report


@pytest.mark.kohya
def test_ddp_harness_smoke_bucket_sync_trains_as_kohyas_sync_on_two_gloo_processes(tmp_path: Path) -> None:
    """bench/ddp_graphs.py --smoke: 2 processes, accelerate's DDP, kohya's trainer and step order."""
    r = _ddp_check(tmp_path, "--smoke")
    assert r["world_size"] == 2 and r["backend"] == "gloo" and r["model"] == "tiny"
    kohya_run, bucket = r["modes"]["eager+kohya-sync"], r["modes"]["eager+bucket"]
    assert kohya_run["synced_by"] == "kohya" and bucket["synced_by"] == "bucket"  # installed by prepare_network
    for run in (kohya_run, bucket):
        assert run["ddp_type"] == "DistributedDataParallel"
        assert min(run["pre_sync_rank_diff"]) > 0  # DDP itself averaged nothing: kohya never calls its forward
        assert max(run["post_sync_rank_diff"]) == 0.0 and max(run["sync_vs_mean_of_ranks"]) == 0.0
    assert r["vs_eager_kohya_sync"]["eager+bucket"] == {"grad_max_rel_diff": 0.0, "loss_max_rel_diff": 0.0,
                                                         "weight_max_abs_diff": 0.0}
    tested = r["selftest"]  # on a CPU its runs are eager: they run, train alike and leave nothing to judge
    assert set(tested["cases"]) == {"eager+bucket", "graphs+bucket", "capture-fails"}
    assert tested["graphs_under_ddp_ok"] is None and tested["failed_capture_falls_back_ok"] is None
    for name in ("graphs+bucket", "capture-fails"):
        case = tested["cases"][name]
        assert "error" not in case and case["device_usable_after"] and case["capture_error"] is None
        assert case["vs_eager_bucket"] == {"grad_max_rel_diff": 0.0, "loss_max_rel_diff": 0.0, "weight_max_abs_diff": 0.0}


@pytest.mark.kohya
@pytest.mark.gpu
def test_ddp_graphs_train_like_eager_ddp_on_two_gpus(tmp_path: Path) -> None:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("gpu: needs 2 CUDA GPUs")
    r = _ddp_check(tmp_path, "--no-throughput", "--model", "tiny")
    tested = r["selftest"]
    assert tested["graphs_under_ddp_ok"] and tested["failed_capture_falls_back_ok"], json.dumps(tested)[-4000:]
    for mode in ("graphs+bucket", "graphs+kohya-sync"):
        run = r["modes"][mode]
        assert run["off_reason"] is None and run["replays"] == r["steps"] and run["eager_calls"] == 0
        assert max(run["post_sync_rank_diff"]) == 0.0
        assert r["vs_eager_kohya_sync"][mode]["grad_max_rel_diff"] <= 2e-3
        assert r["vs_eager_kohya_sync"][mode]["loss_max_rel_diff"] <= 2e-3


# --- the capture over alias leaves (issue #18: DDP holds the parameters' AccumulateGrad nodes) ----------

ALIAS_CHECK = Path(__file__).with_name("_alias_ddp_check.py")


@pytest.mark.kohya
def test_capture_over_aliases_trains_as_the_eager_path_under_gloo_ddp(tmp_path: Path) -> None:
    """lora_fast.capture_over_aliases with make_graphed_callables' contract kept eagerly (CUDA graphs need a
    GPU: bench/ddp_graphs.py's self-test runs the real capture there), under accelerate's DDP on 2 gloo
    processes: the synced gradients, losses and weights are the eager path's bit for bit, and the capture
    reaches only the aliases (which share the weights' storage), never a parameter DDP holds."""
    env = kohya.kohya_env()
    root = str(ALIAS_CHECK.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "alias.json"
    done = subprocess.run([str(kohya.find_python()), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           "2", str(ALIAS_CHECK), "--out", str(out)], cwd=kohya.find_sd_scripts(), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and out.is_file(), done.stdout[-2000:] + done.stderr[-3000:]
    r = json.loads(out.read_text(encoding="utf-8"))
    assert r["world_size"] == 2 and r["ddp_type"] == "DistributedDataParallel"
    assert all(r["grads_equal"]) and r["grad_max_diff"] == 0.0 and r["losses_equal"] and r["weights_equal"]
    assert r["unet_params"] > 0 and r["reached"] == r["unet_params"] + 1  # the aliases and the text conditioning
    assert r["reached_aliases"] == r["reached"] and not r["reached_a_parameter"]
    assert r["aliases_share_storage"]


@pytest.mark.kohya
def test_ddp_harness_reports_each_dead_process_traceback(tmp_path: Path) -> None:
    """A check whose processes die (here: no sd-scripts where SD_SCRIPTS_DIR points) comes back with each dead
    process's full traceback in the JSON, not only the launcher's tail."""
    env = kohya.kohya_env()
    env["PYTHONPATH"] = os.pathsep.join([str(DDP_HARNESS.parent.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["SD_SCRIPTS_DIR"] = str(tmp_path)
    out = tmp_path / "ddp.json"
    done = subprocess.run([str(kohya.find_python()), str(DDP_HARNESS), "--out", str(out), "--smoke"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and out.is_file(), done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))["check"]
    assert not report["ok"] and report["returncode"] != 0 and "selftest" not in report
    # the process that dies first is always there; torchrun then stops the other (SIGTERM: no Python exception),
    # which under load can come before that one reached its own failure (seen: rank1 only)
    assert report["tracebacks"] and set(report["tracebacks"]) <= {"rank0", "rank1"}
    assert all("Traceback" in tb and "train_network" in tb for tb in report["tracebacks"].values())
