"""kohya_ss GUI configs (the LoRA tab's saved JSON, or TOML) → kohya's options, as the GUI would pass them.

The GUI saves its widgets' values, often as strings ("0.0001", "512,650", "1234"), under its own names
(`optimizer`, `max_resolution`, `epoch`, `LoRA_type`, `lr_warmup` in percent). What it passes to
sd-scripts is built in kohya_ss's `kohya_gui/lora_gui.py` (`train_model`); this module follows that
function so an adopted run trains what the GUI would have trained, and accounts for every key: each is
converted into kohya's option or dropped with the reason.
"""

from __future__ import annotations

from typing import Any

from dermkohya.adopt.source import STRING_OPTIONS, NoteKind, Source, parse_flags, scalar
from dermkohya.errors import DermkohyaError

# Keys that mark a file as a kohya_ss GUI config rather than an sd-scripts --config_file.
MARKERS = frozenset({"LoRA_type", "max_resolution", "epoch", "additional_parameters", "optimizer", "lr_warmup"})

# Same name in the GUI and in sd-scripts; the value only needs its type back.
SAME = frozenset("""
bucket_no_upscale cache_latents cache_latents_to_disk color_aug debiased_estimation_loss dim_from_weights enable_bucket
flip_aug full_bf16 full_fp16 gradient_checkpointing highvram masked_loss mem_eff_attn random_crop save_state
save_state_on_train_end scale_v_pred_loss_like_noise_pred shuffle_caption v2 v_parameterization weighted_captions fp8_base
async_upload skip_cache_check save_state_to_huggingface log_config clip_skip ip_noise_gamma ip_noise_gamma_random_strength
max_timestep min_snr_gamma min_timestep sample_every_n_epochs sample_every_n_steps save_every_n_epochs save_every_n_steps
save_last_n_steps save_last_n_steps_state save_last_n_epochs save_last_n_epochs_state v_pred_like_loss vae_batch_size seed
max_train_epochs max_train_steps unet_lr bucket_reso_steps caption_dropout_every_n_epochs caption_dropout_rate
gradient_accumulation_steps keep_tokens max_bucket_reso min_bucket_reso max_grad_norm max_token_length network_alpha
network_dim network_dropout prior_loss_weight scale_weight_norms huber_c huber_scale persistent_data_loader_workers
caption_extension huber_schedule loss_type lr_scheduler mixed_precision save_precision save_model_as sample_sampler
training_comment log_with log_tracker_name wandb_run_name metadata_author metadata_description metadata_license
metadata_tags metadata_title huggingface_repo_id huggingface_repo_type huggingface_repo_visibility huggingface_path_in_repo
output_name resume_from_huggingface lr_scheduler_type lr_scheduler_power pretrained_model_name_or_path train_data_dir
reg_data_dir output_dir logging_dir vae dataset_config resume log_tracker_config network_weights learning_rate train_batch_size
""".split())
INTEGERS = frozenset("""train_batch_size bucket_reso_steps caption_dropout_every_n_epochs gradient_accumulation_steps keep_tokens max_bucket_reso
min_bucket_reso max_token_length seed max_train_epochs max_train_steps clip_skip max_data_loader_n_workers
lr_scheduler_num_cycles save_every_n_epochs save_every_n_steps""".split())
SECRETS = frozenset({"huggingface_token", "wandb_api_key"})
LAUNCH = {"num_processes": "num_processes", "num_machines": "num_machines", "gpu_ids": "gpu_ids",
          "main_process_port": "main_process_port", "num_cpu_threads_per_process": "num_cpu_threads_per_process",
          "multi_gpu": "multi_gpu", "extra_accelerate_launch_args": "extra", "dynamo_backend": "dynamo_backend",
          "dynamo_mode": "dynamo_mode", "dynamo_use_fullgraph": "dynamo_use_fullgraph", "dynamo_use_dynamic": "dynamo_use_dynamic"}
GUI_ONLY = {
    "model_list": "the GUI's model picker; the model is `pretrained_model_name_or_path`",
    "save_as_bool": "a GUI display switch",
    "lowvram": "removed from sd-scripts; the GUI no longer passes it",
    "no_token_padding": "a DreamBooth-tab option: the GUI's LoRA tab does not pass it",
    "stop_text_encoder_training": "the GUI ignores it (\"not yet supported\")",
    "stop_text_encoder_training_pct": "the GUI ignores it (\"not yet supported\")",
    "noise_offset_type": "not an sd-scripts option: it chose between noise_offset and multires_noise_* (converted there)",
}
# Flux.1 / SD3 / other families' widgets: empty or unused for SD 1.5 and SDXL.
OTHER_FAMILIES = frozenset("""flux1_checkbox ae clip_l t5xxl t5xxl_max_token_length guidance_scale mem_eff_save apply_t5_attn_mask
split_mode train_blocks discrete_flow_shift model_prediction_type timestep_sampling flux1_cache_text_encoder_outputs
flux1_cache_text_encoder_outputs_to_disk sd3_checkbox lumina_checkbox anima_checkbox hunyuan_image_checkbox split_qkv
train_t5xxl img_attn_dim img_mlp_dim img_mod_dim single_dim txt_attn_dim txt_mlp_dim txt_mod_dim single_mod_dim in_dims
train_double_block_indices train_single_block_indices enable_all_linear fp8_base_unet blocks_to_swap cpu_offload_checkpointing
t5xxl_lr""".split())
FAMILY_SWITCHES = ("flux1_checkbox", "sd3_checkbox", "lumina_checkbox", "anima_checkbox", "hunyuan_image_checkbox")

# LoRA_type → (network_module, the GUI keys that become network_args, algo for lycoris).
_LYCORIS_COMMON = ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "bypass_mode", "dora_wd", "module_dropout",
                   "use_scalar", "rank_dropout_scale", "train_norm")
_KOHYA_BLOCKS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims", "block_alphas",
                 "conv_block_dims", "conv_block_alphas", "rank_dropout", "module_dropout")
NETWORKS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "Standard": ("networks.lora", _KOHYA_BLOCKS, None),
    "Kohya LoCon": ("networks.lora", ("conv_dim", "conv_alpha", *_KOHYA_BLOCKS), None),
    "LoRA-FA": ("networks.lora_fa", _KOHYA_BLOCKS, None),
    "Kohya DyLoRA": ("networks.dylora", ("conv_dim", "conv_alpha", *_KOHYA_BLOCKS, "unit"), None),
    "LoCon": ("lycoris.kohya", _LYCORIS_COMMON, "locon"),
    "LyCORIS/LoCon": ("lycoris.kohya", _LYCORIS_COMMON, "locon"),
    "LyCORIS/LoHa": ("lycoris.kohya", _LYCORIS_COMMON, "loha"),
    "LyCORIS/LoKr": ("lycoris.kohya", (*_LYCORIS_COMMON, "factor", "use_cp", "decompose_both"), "lokr"),
    "LyCORIS/iA3": ("lycoris.kohya", ("conv_dim", "conv_alpha", "train_on_input"), "ia3"),
    "LyCORIS/GLoRA": ("lycoris.kohya", ("conv_dim", "conv_alpha", "use_tucker", "rank_dropout", "module_dropout",
                                        "rank_dropout_scale", "train_norm"), "glora"),
    "LyCORIS/DyLoRA": ("lycoris.kohya", ("conv_dim", "conv_alpha", "use_tucker", "unit", "rank_dropout", "module_dropout",
                                         "train_norm"), "dylora"),
    "LyCORIS/Native Fine-Tuning": ("lycoris.kohya", ("rank_dropout", "module_dropout", "rank_dropout_scale", "train_norm"), "full"),
}
NETWORK_KEYS = frozenset(k for _, keys, _ in NETWORKS.values() for k in keys) | {
    "conv_dims", "conv_alphas", "factor", "use_cp", "decompose_both", "unit", "train_on_input", "constrain", "rescaled",
    "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"}


def _empty(value: Any) -> bool:
    """The GUI leaves out "", False, None and 0 (`value not in ["", False, None]`)."""
    return value is None or value == "" or value is False or (not isinstance(value, str) and value == 0)


def _number(key: str, value: Any, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return value
    number = scalar(str(value).strip()) if isinstance(value, str) else value
    if isinstance(number, str):
        raise DermkohyaError(f"{where}: `{key}` = {value!r} is not a number: fix it in the GUI config")
    return int(number) if key in INTEGERS else number


def read(data: dict[str, Any], where: str) -> Source:
    """One GUI config → a Source with a note for every key.

    Long on purpose: it follows kohya_ss' `lora_gui.py::train_model` key by key, in its order, so the two
    can be read side by side when the GUI changes; each branch is a few lines."""
    source = Source(path=where, kind="kohya_ss GUI config", family="sdxl" if _truthy(data.get("sdxl")) else "sd15")
    for switch in FAMILY_SWITCHES:
        if _truthy(data.get(switch)):
            raise DermkohyaError(f"{where}: `{switch}` is on: dermkohya trains SD 1.5 and SDXL only; this config is for another model family")
    args, done = source.args, set()

    def mark(keys: list[str], kind: NoteKind, text: str) -> None:
        for key in keys:
            if key in data and key not in done:
                done.add(key)
                source.note(key, kind, text)

    # network: module and network_args from LoRA_type
    lora_type = str(data.get("LoRA_type") or "Standard")
    if lora_type not in NETWORKS:
        raise DermkohyaError(f"{where}: LoRA_type {lora_type!r} is not one dermkohya converts (known: {', '.join(NETWORKS)}): "
                             "adopt the sd-scripts command the GUI prints instead (`dermkohya adopt --command ...`)")
    module, used, algo = NETWORKS[lora_type]
    args["network_module"] = module
    network_args = []
    for key in used:
        value = data.get(key)
        always = algo is not None or (lora_type == "Kohya LoCon" and key in ("conv_dim", "conv_alpha"))
        if key in data and (always or not _empty(value)):
            network_args.append(f"{'block_size' if (algo == 'dylora' and key == 'unit') else key}={value}")
    if algo:
        preset = data.get("LyCORIS_preset") or "full"
        network_args = [f"preset={preset}", *network_args, f"algo={algo}"]
    for ratio in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        if not _empty(data.get(ratio)):
            network_args.append(f"{ratio}={data[ratio]}")
    if network_args:
        args["network_args"] = [a.replace('"', "") for a in network_args]
    mark(["LyCORIS_preset"], "converted" if algo else "dropped", "→ network_args preset=" if algo else "used only by LyCORIS types")
    mark(["LoRA_type"], "converted", f"→ network_module = {module!r}" + (f" (algo={algo})" if algo else ""))
    mark([k for k in used if k in data], "converted", "→ network_args (as the GUI builds them for this LoRA_type)")
    mark(["loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"], "converted", "→ network_args when set")
    mark(sorted(NETWORK_KEYS), "dropped", f"not used by LoRA_type {lora_type!r} (the GUI ignores it)")

    # renamed or computed
    if not _empty(data.get("optimizer")):
        args["optimizer_type"] = str(data["optimizer"])
    for gui_key in ("optimizer_args", "lr_scheduler_args"):
        words = str(data.get(gui_key) or "").replace('"', "").split()
        if words:
            args[gui_key] = words
    mark(["optimizer"], "converted", "→ optimizer_type")
    mark(["optimizer_args", "lr_scheduler_args"], "converted", "a string of words → a list, quotes removed (as the GUI does)")
    if not _empty(data.get("max_resolution")):
        args["resolution"] = str(data["max_resolution"]).replace(" ", "")
    mark(["max_resolution"], "converted", "→ resolution")

    epoch = int(_number("epoch", data.get("epoch") or 1, where))
    for key in ("max_train_epochs", "max_train_steps"):
        if not _empty(data.get(key)):
            args[key] = _number(key, data[key], where)
    mark([k for k in ("max_train_epochs", "max_train_steps") if k in args], "converted", "same option in sd-scripts")
    mark(["max_train_epochs", "max_train_steps"], "dropped", "empty or 0: not passed (the GUI then counts steps from `epoch`)")
    if "max_train_steps" in args and "max_train_epochs" not in args:
        mark(["epoch"], "dropped", f"max_train_steps = {args['max_train_steps']} is set, so kohya stops there (as in the GUI)")
    elif "max_train_epochs" not in args:
        args["max_train_epochs"] = epoch
        mark(["epoch"], "converted", "→ max_train_epochs (the GUI turns it into the same number of steps)")
    else:
        mark(["epoch"], "dropped", "max_train_epochs is set and wins")
    cycles = data.get("lr_scheduler_num_cycles")
    args["lr_scheduler_num_cycles"] = int(_number("lr_scheduler_num_cycles", cycles, where)) if not _empty(cycles) else epoch
    mark(["lr_scheduler_num_cycles"], "converted", "empty means `epoch` in the GUI")

    warmup_pct = float(_number("lr_warmup", data.get("lr_warmup") or 0, where))
    warmup_steps = float(_number("lr_warmup_steps", data.get("lr_warmup_steps") or 0, where))
    if warmup_steps > 0:
        args["lr_warmup_steps"] = int(warmup_steps)
    elif warmup_pct:
        args["lr_warmup_steps"] = warmup_pct / 100
    mark(["lr_warmup"], "converted", f"{warmup_pct:g}% → lr_warmup_steps = {warmup_pct / 100:g} (kohya reads a float below 1 as a fraction of the steps)"
         if warmup_pct and not warmup_steps > 0 else "0% → no warmup")
    mark(["lr_warmup_steps"], "converted", "absolute steps win over lr_warmup %")

    te_lr = float(_number("text_encoder_lr", data.get("text_encoder_lr") or 0, where))
    unet_lr = float(_number("unet_lr", data.get("unet_lr") or 0, where))
    if te_lr:
        args["text_encoder_lr"] = [te_lr, te_lr]
    if te_lr == 0 and unet_lr != 0:
        args["network_train_unet_only"] = True
    if te_lr != 0 and unet_lr == 0:
        args["network_train_text_encoder_only"] = True
    mark(["text_encoder_lr"], "converted", "→ text_encoder_lr; 0 with a unet_lr means network_train_unet_only (as in the GUI)")

    attention = data.get("xformers")
    if attention is True or attention == "xformers":
        args["xformers"] = True
    elif attention == "sdpa":
        args["sdpa"] = True
    mark(["xformers"], "converted", "true/\"xformers\" → xformers, \"sdpa\" → sdpa, otherwise neither")

    sdxl = source.family == "sdxl"
    if sdxl and _truthy(data.get("sdxl_no_half_vae")):
        args["no_half_vae"] = True
    if sdxl and _truthy(data.get("sdxl_cache_text_encoder_outputs")):
        args["cache_text_encoder_outputs"] = True
    mark(["sdxl"], "converted", f"→ {'sdxl_train_network.py' if sdxl else 'train_network.py'} ([model] family)")
    mark(["sdxl_no_half_vae"], "converted" if sdxl else "dropped", "→ no_half_vae" if sdxl else "SDXL only")
    mark(["sdxl_cache_text_encoder_outputs"], "converted" if sdxl else "dropped", "→ cache_text_encoder_outputs" if sdxl else "SDXL only")

    kind = str(data.get("noise_offset_type") or "Original")
    if kind == "Original":
        for key in ("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength"):
            if not _empty(data.get(key)):
                args[key] = _number(key, data[key], where)
        mark(["noise_offset", "adaptive_noise_scale", "noise_offset_random_strength"], "converted", "noise_offset_type is Original")
        mark(["multires_noise_iterations", "multires_noise_discount"], "dropped", "noise_offset_type is Original, not Multires")
    else:
        for key in ("multires_noise_iterations", "multires_noise_discount"):
            if not _empty(data.get(key)):
                args[key] = _number(key, data[key], where)
        mark(["multires_noise_iterations", "multires_noise_discount"], "converted", "noise_offset_type is Multires")
        mark(["noise_offset", "adaptive_noise_scale", "noise_offset_random_strength"], "dropped", "noise_offset_type is Multires, not Original")

    if not _empty(data.get("lora_network_weights")):
        args["network_weights"] = str(data["lora_network_weights"])
    mark(["lora_network_weights"], "converted", "→ network_weights")
    prompts = [line.strip() for line in str(data.get("sample_prompts") or "").splitlines() if line.strip()]
    if prompts:
        args["sample_prompts"] = prompts  # the GUI's text box: prompts, not a file
    mark(["sample_prompts"], "converted", "the GUI's prompt text → [sample] prompts")
    if not _empty(data.get("max_data_loader_n_workers")) or "max_data_loader_n_workers" in data:
        args["max_data_loader_n_workers"] = int(_number("max_data_loader_n_workers", data.get("max_data_loader_n_workers") or 0, where))
    mark(["max_data_loader_n_workers"], "converted", "always passed by the GUI, 0 included")

    for key, name in LAUNCH.items():
        if not _empty(data.get(key)):
            source.launch[name] = data[key] if isinstance(data[key], bool) else _launch_value(data[key])
    mark(list(LAUNCH), "converted", "→ [launch] (accelerate's options)")
    mark(sorted(SECRETS), "dropped", "a secret: never written into a run file (give it to kohya through the environment)")
    for key, reason in GUI_ONLY.items():
        mark([key], "dropped", reason)
    mark(sorted(OTHER_FAMILIES), "dropped", "another model family's setting (Flux.1/SD3/…), unused for SD 1.5 and SDXL")

    for key in sorted(SAME & data.keys() - done):
        done.add(key)
        value = data[key]
        if _empty(value):
            source.note(key, "dropped", "empty, false or 0: the GUI leaves it out and kohya's default applies")
            continue
        args[key] = _typed(key, value)
        source.note(key, "converted", "same option in sd-scripts" + (f" (the GUI's string {value!r} read as a number)"
                                                                     if isinstance(value, str) and not isinstance(args[key], str) else ""))

    extra = str(data.get("additional_parameters") or "").replace('"', "").split()
    if extra:
        flags = parse_flags(extra, f"{where}: additional_parameters")
        args.update(flags)
        mark(["additional_parameters"], "converted", f"raw flags → {', '.join(sorted(flags))} (they override the GUI's values, as on its command line)")
    else:
        mark(["additional_parameters"], "dropped", "empty")
    for key in sorted(data.keys() - done):
        source.note(key, "dropped", "not a kohya_ss LoRA-tab key dermkohya knows (a newer or older GUI?): set it by hand if it matters")
    return source


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in {"true", "1", "yes"}) or (isinstance(value, (int, float)) and value == 1)


def _typed(key: str, value: Any) -> Any:
    """A GUI value as kohya's parser would type it: the GUI saves many numbers as strings."""
    if isinstance(value, bool):
        return value
    if key == "persistent_data_loader_workers":  # the GUI passes int(checkbox)
        return bool(value)
    if isinstance(value, str) and value.strip() and key not in STRING_OPTIONS and not key.startswith("metadata_"):
        value = scalar(value.strip())
    return int(value) if key in INTEGERS and isinstance(value, (int, float)) else value


def _launch_value(value: Any) -> Any:
    return scalar(value.strip()) if isinstance(value, str) else value
