"""Parse an sd-scripts command line with the script's own parser; print its values as JSON.

Run by kohya's Python from the sd-scripts folder (tests only), with a JSON list of command lines on
stdin (one import of the script serves them all; it takes seconds):
    echo '[["--config_file", "x.toml"], ["--network_dim", "8"]]' | <kohya python> tests/kohya_parse.py train_network.py
It does what train_network.py's `__main__` does before training: `setup_parser()`, `parse_args`,
then `train_util.read_config_from_file`, so a value from --config_file and one from the command line
arrive exactly as kohya's training code would see them. Nothing of sd-scripts is copied here.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def main() -> None:
    script, argvs = sys.argv[1], json.load(sys.stdin)
    sys.path.insert(0, ".")
    from library import train_util

    module = importlib.import_module(Path(script).stem)
    results = []
    for argv in argvs:
        sys.argv = [script, *argv]  # read_config_from_file parses sys.argv again, over the config's values
        parser = module.setup_parser()
        args = train_util.read_config_from_file(parser.parse_args(), parser)
        results.append({key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()})
    print("DERMKOHYA-PARSED " + json.dumps(results, sort_keys=True, default=repr))


if __name__ == "__main__":
    main()
