"""Build kohya's own dataset group from a --dataset_config and print what it will train on, as JSON.

Run by kohya's Python from the sd-scripts folder (tests only):
    <kohya python> tests/kohya_datasets.py <dataset.toml> [<dataset.toml> ...]
It does what train_network.py does before training (its parser, prepare_dataset_args, BlueprintGenerator with the same
ConfigSanitizer, generate_dataset_group_by_blueprint), with the SD latents-caching strategy that
FineTuningDataset asks for, and prints, per config, every subset kohya kept with its image count and each dataset's
train/reg image totals (× repeats). Nothing of sd-scripts is copied here.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def main() -> None:
    sys.path.insert(0, ".")
    import train_network
    from library import config_util, strategy_base, strategy_sd, train_util

    strategy_base.LatentsCachingStrategy.set_strategy(strategy_sd.SdSdxlLatentsCachingStrategy(True, False, 1, False))
    results = []
    for config in sys.argv[1:]:
        results.append(_datasets(config, train_network, config_util, train_util))
    print("DERMKOHYA-DATASETS " + json.dumps(results))


def _datasets(config: str, train_network: Any, config_util: Any, train_util: Any) -> list[dict[str, Any]]:
    args = train_network.setup_parser().parse_args(["--dataset_config", config, "--resolution", "512"])
    train_util.prepare_dataset_args(args, True)
    generator = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, False, True))
    blueprint = generator.generate(config_util.load_user_config(config), args)
    group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    datasets = []
    for dataset in group.datasets:
        subsets = [{"image_dir": s.image_dir, "metadata_file": getattr(s, "metadata_file", None),
                    "is_reg": bool(getattr(s, "is_reg", False)), "num_repeats": s.num_repeats, "images": s.img_count}
                   for s in dataset.subsets]
        datasets.append({"kind": type(dataset).__name__, "subsets": subsets,
                         "num_train_images": dataset.num_train_images, "num_reg_images": dataset.num_reg_images})
    return datasets


if __name__ == "__main__":
    main()
