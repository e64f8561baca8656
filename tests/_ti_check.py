"""Run in kohya's environment (cwd: the project root): load phase 2's base and tokenizer exactly as
train_network.py does from its rendered config, compare the new tokens' rows with phase 1's vectors, and show
the rows are used (the encoder's output for a caption with a token changes when its rows are zeroed).

argv: <sd-scripts> <phase-2 config.toml> <phase-2 dataset.toml> <captions.json> then pairs <token> <kohya TI file>.
Prints one line `TI-CHECK {json}`; exits 1 on any mismatch.
"""

import json
import sys

sd_scripts, config, dataset_config, captions = sys.argv[1:5]
pairs = list(zip(sys.argv[5::2], sys.argv[6::2]))
sys.path.insert(0, sd_scripts)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import train_network  # noqa: E402
from library import strategy_sd, train_util  # noqa: E402

sys.argv = ["train_network.py", "--config_file", config, "--dataset_config", dataset_config]  # kohya re-reads sys.argv
parser = train_network.setup_parser()
args = train_util.read_config_from_file(parser.parse_args(), parser)
tokenizer = strategy_sd.SdTokenizeStrategy(args.v2, args.max_token_length, args.tokenizer_cache_dir)
text_encoder, _, _, _ = train_util._load_target_model(args, torch.float32)
weight = text_encoder.get_input_embeddings().weight
caption_texts = [entry["caption"] for entry in json.load(open(captions, encoding="utf-8")).values()]
report = {"vocab": int(weight.shape[0]), "tokens": {}}
ok = True
for token, path in pairs:
    vectors = load_file(path)["emb_params"].float()
    strings = [token] + [f"{token}{i}" for i in range(1, vectors.shape[0])]
    ids = tokenizer.tokenizer.convert_tokens_to_ids(strings)
    rows = weight[ids].detach().float()
    equal = bool(torch.equal(rows, vectors))
    in_captions = any(set(ids) <= set(tokenizer.tokenize(text)[0].flatten().tolist()) for text in caption_texts)
    init = weight[tokenizer.tokenizer.encode("skin", add_special_tokens=False)[0]].detach().float()
    # the rows are used: the encoder's output for a caption with the token changes when they are zeroed
    text = next(t for t in caption_texts if token in t)
    with torch.no_grad():
        input_ids = tokenizer.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        before = text_encoder(input_ids)[0]
        saved = weight[ids].clone()
        weight[ids] = 0
        after = text_encoder(input_ids)[0]
        weight[ids] = saved
    changed = float((before - after).abs().max())
    report["tokens"][token] = {"ids": ids, "equal": equal, "in_captions": in_captions,
                               "trained": bool(not torch.equal(rows[0], init)),  # phase 1 moved it off init_word's row
                               "max_abs_diff": float((rows - vectors).abs().max()), "output_change_when_zeroed": changed}
    ok = ok and equal and in_captions and min(ids) >= 49408 and changed > 0
print("TI-CHECK " + json.dumps(report))
sys.exit(0 if ok else 1)
