"""Run by tests/test_networks.py with kohya's Python, from the sd-scripts folder (as kohya runs).

Builds tiny models whose classes carry the names kohya's LoRANetwork targets, trains the same
LoRA weights through sd-scripts' networks.lora and through dermkohya.networks.lora_fast, and prints
one JSON object of measured differences for the test to judge.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path.cwd()))  # the sd-scripts folder, first, as when kohya runs a script from it
from networks import lora as kohya_lora  # noqa: E402

from dermkohya.networks import lora_fast  # noqa: E402


class Transformer2DModel(nn.Module):  # the U-Net block kohya targets: Linear and 1x1 Conv2d children
    def __init__(self, channels: int = 8, width: int = 16) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(channels, width, 1)
        self.to_q = nn.Linear(width, width)
        self.ff = nn.Linear(width, width)
        self.proj_out = nn.Conv2d(width, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        b, c, hh, ww = h.shape
        t = h.permute(0, 2, 3, 1).reshape(b, hh * ww, c)
        q = self.to_q(t)[:, None]  # one head: SDPA as kohya's attention calls it (sdpa=cudnn picks its kernel)
        t = self.ff(torch.nn.functional.gelu(q + torch.nn.functional.scaled_dot_product_attention(q, q, q))[:, 0])
        return x + self.proj_out(t.reshape(b, hh, ww, c).permute(0, 3, 1, 2))


class ResnetBlock2D(nn.Module):  # targeted only with conv_dim (3x3 conv LoRA)
    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(torch.nn.functional.silu(x))


class TinyUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ResnetBlock2D(), Transformer2DModel(), Transformer2DModel()])

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = x + cond.mean(dim=1)[:, :8, None, None]
        for block in self.blocks:
            x = block(x)
        return x


class CLIPAttention(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.softmax(self.q_proj(x), dim=-1))


class CLIPMLP(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class TinyTextEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = CLIPAttention()
        self.mlp = CLIPMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x + self.attn(x))


def build(module: object, kwargs: dict[str, str], state: dict[str, torch.Tensor] | None, dropout: float | None = None):
    torch.manual_seed(0)
    te, unet = TinyTextEncoder(), TinyUNet()
    torch.manual_seed(1)
    network = module.create_network(1.0, 4, 2.0, None, te, unet, neuron_dropout=dropout, **dict(kwargs))
    network.apply_to(te, unet, True, True)
    if state is not None:
        network.load_state_dict(state)
    network.requires_grad_(True)
    return network, te, unet


def step(network, te, unet, seed: int = 2, autocast: bool = False):
    torch.manual_seed(seed)
    tokens = torch.randn(2, 5, 16)
    latents = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = unet(latents, te(tokens))
    loss = out.float().pow(2).mean()
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in network.named_parameters()}
    return out.detach().float(), grads


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def compare(kwargs: dict[str, str], autocast: bool = False, dropout: float | None = None) -> dict[str, object]:
    ref, te_r, unet_r = build(kohya_lora, kwargs, None, dropout)
    torch.manual_seed(3)
    state = {k: (torch.randn_like(v) * 0.1 if k.endswith("weight") else v) for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    fast, te_f, unet_f = build(lora_fast, kwargs, copy.deepcopy(state), dropout)
    out_r, grads_r = step(ref, te_r, unet_r, autocast=autocast)
    out_f, grads_f = step(fast, te_f, unet_f, autocast=autocast)
    scale = max(float(v.abs().max()) for v in grads_r.values())
    return {
        "modules": len(ref.text_encoder_loras) + len(ref.unet_loras),
        "fused": sum(type(m) is lora_fast.FusedLoRAModule for m in fast.text_encoder_loras + fast.unet_loras),
        "conv3x3": sum(m.lora_down.kernel_size == (3, 3) for m in ref.unet_loras if isinstance(m.lora_down, nn.Conv2d)),
        "out_diff": float((out_r - out_f).abs().max()),
        "out_scale": float(out_r.abs().max()),
        "grad_diff": max_diff(grads_r, grads_f),
        "grad_scale": scale,
        "same_keys": list(ref.state_dict()) == list(fast.state_dict()),
        "same_shapes": all(ref.state_dict()[k].shape == v.shape for k, v in fast.state_dict().items()),
        "graphs_installed": fast.dk_unet_graphs is not None,
    }


def saved_files(device: str = "cpu") -> dict[str, object]:
    """Both networks' files (on a GPU: lora_fast copies the weights to the host in one transfer per dtype,
    kohya tensor by tensor; the hashes in the metadata then say whether the bytes are the same)."""
    from safetensors import safe_open

    ref, te_r, unet_r = build(kohya_lora, {}, None)
    fast, te_f, unet_f = build(lora_fast, {}, copy.deepcopy(ref.state_dict()))  # save_copy=background
    batched, _, _ = build(lora_fast, {"save_copy": "batched"}, copy.deepcopy(ref.state_dict()))
    for network in (ref, fast, batched):
        network.to(device)
    metadata = {"ss_network_module": "dermkohya.networks.lora_fast", "ss_network_dim": "4", "ss_network_alpha": "2.0"}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, network in (("kohya", ref), ("fast", fast), ("fast_batched", batched)):
            path = Path(tmp) / f"{name}.safetensors"
            network.save_weights(str(path), torch.float16, dict(metadata))
            if name == "fast":
                out["background_written_by"] = fast.dk_saver.thread.name if fast.dk_saver.thread else None
                fast.wait_for_saves()
            with safe_open(str(path), framework="pt") as fh:
                out[name] = {
                    "metadata": fh.metadata(),
                    "tensors": {k: [str(fh.get_tensor(k).dtype), list(fh.get_tensor(k).shape)] for k in fh.keys()},
                }
        out["nothing_left_beside"] = sorted(p.name for p in Path(tmp).iterdir())
        # a file written by lora_fast loads into kohya's own network, and back
        te, unet = TinyTextEncoder(), TinyUNet()
        loaded, _ = kohya_lora.create_network_from_weights(1.0, str(Path(tmp) / "fast.safetensors"), None, te, unet)
        loaded.apply_to(te, unet)
        info = loaded.load_weights(str(Path(tmp) / "fast.safetensors"))
        expected = {k: v.to(torch.float16).cpu() for k, v in fast.state_dict().items()}
        out["reloads_in_kohya"] = (not info.missing_keys and not info.unexpected_keys
                                   and all(torch.equal(v.to(torch.float16), expected[k]) for k, v in loaded.state_dict().items()))
        again, _ = lora_fast.create_network_from_weights(1.0, str(Path(tmp) / "kohya.safetensors"), None,
                                                         TinyTextEncoder(), TinyUNet())
        out["from_weights_adopted"] = type(again).__name__
    out["metadata_arg_untouched"] = metadata["ss_network_module"] == "dermkohya.networks.lora_fast"
    uploading, _, _ = build(lora_fast, {}, None)
    uploading.prepare_network(SimpleNamespace(huggingface_repo_id="someone/lora"))
    out["uploads_save_in_the_caller"] = uploading.dk_save_copy
    return out


def option_errors() -> list[str]:
    messages = []
    for bad in ({"cuda_graph": "sometimes"}, {"max_graphs": "two"}, {"max_graphs": "0"}, {"grad_sync": "sometimes"},
                {"sdpa": "flash"}, {"conv_benchmark": "maybe"}, {"save_copy": "fast"}, {"channels_last": "yes"}, {"norms": "fp32"}):
        try:
            build(lora_fast, bad, None)
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def cpu_dispatch() -> dict[str, object]:
    """cuda_graph=on with no CUDA: no dispatcher, and the eager path is unchanged; the dispatcher itself
    (as installed on a GPU machine) sends CPU tensors to the eager forward."""
    ref, te_r, unet_r = build(kohya_lora, {}, None)
    state = {k: (torch.randn_like(v) * 0.1 if k.endswith("weight") else v) for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    fast, te_f, unet_f = build(lora_fast, {"cuda_graph": "on"}, copy.deepcopy(state))
    out_r, _ = step(ref, te_r, unet_r)
    out_f, _ = step(fast, te_f, unet_f)
    installed = fast.dk_unet_graphs is not None
    graphs = lora_fast.UNetGraphs(unet_f, fast.unet_loras, max_graphs=2)
    torch.manual_seed(2)
    via = graphs(torch.randn(2, 8, 6, 6), torch.randn(2, 5, 16))
    torch.manual_seed(2)
    direct = unet_f(torch.randn(2, 8, 6, 6), torch.randn(2, 5, 16))
    return {"installed": installed, "eager_calls": graphs.eager_calls, "replays": graphs.replays,
            "off_reason": graphs.off_reason, "out_diff": float((out_r - out_f).abs().max()),
            "dispatch_diff": float((via - direct).abs().max())}


def te_dispatch() -> dict[str, object]:
    """TextEncoderGraphs without CUDA: the eager forward, unchanged; the keyword calls a graph is captured for
    (SD 1.x/2.x's none, SDXL's output_hidden_states/return_dict) and the rest; and each of SDXL's two encoders
    gets exactly its own LoRA layers."""
    _, te, _ = build(lora_fast, {}, None)
    graphs = lora_fast.TextEncoderGraphs(te, [m for m in te.modules() if isinstance(m, lora_fast.FusedLoRAModule)] or
                                         [te], max_graphs=2)
    tokens = torch.randn(2, 5, 16)
    eager = te(tokens)
    accepts = {name: graphs.accepts(kwargs) for name, kwargs in {
        "none": {}, "sdxl": {"output_hidden_states": True, "return_dict": True}, "tuple": {"return_dict": False},
        "attention_mask": {"attention_mask": None}, "output_attentions": {"output_attentions": True}}.items()}
    torch.manual_seed(0)
    te1, te2, unet = TinyTextEncoder(), TinyTextEncoder(), TinyUNet()
    network = lora_fast.create_network(1.0, 4, 2.0, None, [te1, te2], unet)
    network.apply_to([te1, te2], unet, True, True)
    split = [lora_fast.loras_of(te, network.text_encoder_loras) for te in (te1, te2)]
    return {"eager_diff": float((graphs(tokens) - eager).abs().max()), "eager_calls": graphs.eager_calls,
            "replays": graphs.replays, "accepts": accepts,
            "split": [sorted({lora.lora_name.split("_")[1] for lora in loras}) for loras in split],
            "split_sizes": [len(loras) for loras in split], "te_loras": len(network.text_encoder_loras)}


def sdxl_text_encoder_graphs(dtype: str, flat: bool = False) -> dict[str, object]:
    """On a GPU: SDXL's two text encoders (transformers' CLIPTextModel and CLIPTextModelWithProjection, tiny and
    random) called as kohya's SDXL strategy calls them (output_hidden_states=True, return_dict=True; it reads
    hidden_states[-2], last_hidden_state and the projection), trained six steps through graph replay and through
    the eager path from the same weights and inputs."""
    from accelerate import Accelerator
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    autocast_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    config = CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=8, projection_dim=16, eos_token_id=63)
    runs = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        te1 = CLIPTextModel(config).cuda().requires_grad_(False)
        te2 = CLIPTextModelWithProjection(config).cuda().requires_grad_(False)
        unet = TinyUNet().cuda().requires_grad_(False)
        torch.manual_seed(1)
        network = lora_fast.create_network(1.0, 4, 2.0, None, [te1, te2], unet, cuda_graph=mode)
        if flat and mode == "on":
            accelerator = Accelerator()  # noqa: F841 — kohya's train() has one by this name: prepare_network finds it
            network.prepare_network(SimpleNamespace())
        network.apply_to([te1, te2], unet, True, True)
        torch.manual_seed(2)
        for p in network.parameters():  # lora_up starts at zero: give every LoRA a gradient of its own
            torch.nn.init.normal_(p, std=0.1)
        network.cuda().requires_grad_(True)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
        outs, losses, grads = [], [], []
        for step_no in range(6):
            torch.manual_seed(10 + step_no)
            ids = torch.randint(0, 62, (2, 8), device="cuda")
            ids[:, -1] = 63  # the end token: where the pooled output is read
            latents = torch.randn(2, 8, 6, 6, device="cuda")
            with torch.autocast("cuda", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
                out1 = te1(ids, output_hidden_states=True, return_dict=True)
                out2 = te2(ids, output_hidden_states=True, return_dict=True)
                cond = torch.cat([out1["hidden_states"][-2], out2["hidden_states"][-2]], dim=-1)
                out = unet(latents, cond)
            loss = (out.float().pow(2).mean() + out2["text_embeds"].float().pow(2).mean()
                    + 0.1 * out2["last_hidden_state"].float().pow(2).mean())
            loss.backward()
            # eager: no gradient for the LoRA layers only the unread outputs depend on (te1's last layer, as in
            # kohya's SDXL), the graphs a zero one
            unused = sorted(n for n, p in network.named_parameters() if p.grad is None)
            grads.append({n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().cpu().clone()
                          for n, p in network.named_parameters()})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            outs.append(torch.cat([out.detach().float().flatten().cpu(), out2["text_embeds"].detach().float().flatten().cpu()]))
            losses.append(float(loss))
        te_graphs = network.dk_te_graphs_all if mode == "on" else []
        runs[mode] = {"outs": outs, "losses": losses, "grads": grads,
                      "state": {k: v.detach().float().cpu() for k, v in network.state_dict().items()},
                      "te_replays": [g.replays for g in te_graphs], "te_off": [g.off_reason for g in te_graphs],
                      "te_flat": [bool(g.flat) for g in te_graphs], "types": [type(out1).__name__, type(out2).__name__],
                      "hidden_states": [len(out1["hidden_states"]), len(out2["hidden_states"])], "unused": unused}
    on, off = runs["on"], runs["off"]
    return {
        "te_replays": on["te_replays"], "te_off": on["te_off"], "te_flat": on["te_flat"],
        "types": on["types"], "types_eager": off["types"], "hidden_states": on["hidden_states"],
        "hidden_states_eager": off["hidden_states"],
        "out_diff": max(float((a - b).abs().max()) for a, b in zip(on["outs"], off["outs"])),
        "out_scale": max(float(a.abs().max()) for a in off["outs"]),
        "grad_diffs": [max_diff(a, b) for a, b in zip(on["grads"], off["grads"])],
        "grad_scale": max(float(v.abs().max()) for g in off["grads"] for v in g.values()),
        "unused_eager": off["unused"], "unused_graphs": on["unused"],
        "te_zero_grads": [k for k, v in on["grads"][0].items() if k.startswith("lora_te") and float(v.abs().max()) == 0],
        "loss_on": on["losses"], "loss_off": off["losses"],
        "weight_diff": max_diff(on["state"], off["state"]),
        "weight_scale": max(float(v.abs().max()) for v in off["state"].values()),
    }


def cuda_graphs(dtype: str, set_to_none: bool = True, flat: bool = False, **options: str) -> dict[str, object]:
    """On a GPU: the same LoRA trained for several steps through graph replay (cuda_graph=on) and through
    the eager path (cuda_graph=off), from the same weights and inputs, under autocast as kohya trains
    (kohya zeroes gradients with set_to_none=True; False is checked too: .grad must not alias a graph buffer).
    `options` (sdpa, conv_benchmark) go to the replayed network only: the eager one is the reference. `flat`: the
    replayed network is prepared as kohya's trainer prepares it, with an accelerator (flat_weights=on then takes
    effect: one weight input per graph)."""
    from accelerate import Accelerator

    autocast_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    ref, _, _ = build(kohya_lora, {}, None)
    torch.manual_seed(3)
    state = {k: (torch.randn_like(v) * 0.1 if k.endswith("weight") else v) for k, v in ref.state_dict().items()}
    runs = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        te, unet = TinyTextEncoder().cuda().requires_grad_(False), TinyUNet().cuda().requires_grad_(False)  # frozen, as kohya has them
        torch.manual_seed(1)
        network = lora_fast.create_network(1.0, 4, 2.0, None, te, unet, cuda_graph=mode,
                                           **(options if mode == "on" else {}))
        if flat and mode == "on":
            accelerator = Accelerator()  # noqa: F841 — kohya's train() has one by this name: prepare_network finds it
            network.prepare_network(SimpleNamespace())
        network.apply_to(te, unet, True, True)
        te_graphs = None
        if mode == "on":  # the tiny encoder is not CLIPTextModel: its graphs installed by hand, as apply_to does
            te_graphs = lora_fast.TextEncoderGraphs(te, network.text_encoder_loras, max_graphs=2,
                                                    flat_weights=network._flat_weights())
            te.forward = te_graphs
        network.load_state_dict(copy.deepcopy(state))
        network.cuda().requires_grad_(True)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.05)
        outs, losses, grads = [], [], []
        for step_no in range(6):
            torch.manual_seed(10 + step_no)
            tokens = torch.randn(2, 5, 16, device="cuda")
            latents = torch.randn(2, 8, 6, 6, device="cuda")
            with torch.autocast("cuda", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
                out = unet(latents, te(tokens))
            loss = out.float().pow(2).mean()
            loss.backward()
            grads.append({n: p.grad.detach().float().cpu().clone() for n, p in network.named_parameters()})
            if step_no == 2:
                storages = {p.grad.untyped_storage().data_ptr() for p in network.parameters()}
            optimizer.step()
            optimizer.zero_grad(set_to_none=set_to_none)  # kohya's order: step, then zero
            outs.append(out.detach().float().cpu())
            losses.append(float(loss))
        graphs = network.dk_unet_graphs
        runs[mode] = {"outs": outs, "losses": losses, "grads": grads,
                      "state": {k: v.detach().float().cpu() for k, v in network.state_dict().items()},
                      "replays": graphs.replays if graphs else 0, "off_reason": graphs.off_reason if graphs else "not installed",
                      "te_replays": te_graphs.replays if te_graphs else 0,
                      "te_off_reason": te_graphs.off_reason if te_graphs else "not installed",
                      "flat": bool(graphs and graphs.flat), "te_flat": bool(te_graphs and te_graphs.flat),
                      "grad_storages": len(storages)}
    on, off = runs["on"], runs["off"]
    return {
        "replays": on["replays"], "off_reason": on["off_reason"], "eager_replays": off["replays"],
        "te_replays": on["te_replays"], "te_off_reason": on["te_off_reason"],
        "flat": on["flat"], "te_flat": on["te_flat"], "grad_storages": on["grad_storages"],
        "out_diffs": [float((a - b).abs().max()) for a, b in zip(on["outs"], off["outs"])],
        "grad_diffs": [max_diff(a, b) for a, b in zip(on["grads"], off["grads"])],
        "out_diff": max(float((a - b).abs().max()) for a, b in zip(on["outs"], off["outs"])),
        "out_scale": max(float(a.abs().max()) for a in off["outs"]),
        "grad_scale": max(float(v.abs().max()) for g in off["grads"] for v in g.values()),
        "loss_on": on["losses"], "loss_off": off["losses"],
        "weight_diff": max_diff(on["state"], off["state"]),
        "weight_scale": max(float(v.abs().max()) for v in off["state"].values()),
        "weights_moved": max_diff(off["state"], {k: v.float() for k, v in state.items()}),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    result = {
        "linear_conv1x1": compare({}),
        "conv3x3": compare({"conv_dim": "4", "conv_alpha": "1"}),
        "autocast_bf16": compare({}, autocast=True),
        "dropout_falls_back": compare({}, dropout=0.1),
        "files": saved_files(),
        "option_errors": option_errors(),
        "cpu_dispatch": cpu_dispatch(),
        "te_dispatch": te_dispatch(),
    }
    if torch.cuda.is_available():
        result["cuda_graphs"] = {dtype: cuda_graphs(dtype) for dtype in ("fp32", "fp16", "bf16")}
        result["cuda_graphs"]["fp32_grads_zeroed_in_place"] = cuda_graphs("fp32", set_to_none=False)
        result["cuda_graphs"]["fp16_cudnn_kernels"] = cuda_graphs("fp16", sdpa="cudnn", conv_benchmark="on")
        for dtype in ("fp32", "fp16", "bf16"):
            result["cuda_graphs"][f"{dtype}_flat_weights"] = cuda_graphs(dtype, flat=True)
        result["cuda_graphs"]["fp16_flat_weights_grads_zeroed_in_place"] = cuda_graphs("fp16", set_to_none=False, flat=True)
        result["sdxl_te_graphs"] = {dtype: sdxl_text_encoder_graphs(dtype) for dtype in ("fp32", "fp16", "bf16")}
        result["sdxl_te_graphs"]["fp16_flat_weights"] = sdxl_text_encoder_graphs("fp16", flat=True)
        result["files_cuda"] = saved_files("cuda")
        torch.backends.cudnn.benchmark = False
    sys.stdout.write("NETWORKS-CHECK " + json.dumps(result) + "\n")
