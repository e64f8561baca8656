"""Bench only: bench/train_throughput.py puts this folder on kohya's PYTHONPATH when it profiles a variant.

Starts bench/step_profile.py's sampler in kohya's training process (only when DERMKOHYA_STEP_PROFILE is set
and the script is train_network.py / sdxl_train_network.py), then runs the sitecustomize this one shadows.
"""

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _start() -> None:
    if not os.environ.get("DERMKOHYA_STEP_PROFILE"):
        return
    try:
        path = os.path.join(os.path.dirname(_HERE), "step_profile.py")
        spec = importlib.util.spec_from_file_location("dermkohya_step_profile", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        module.install()
    except Exception as exc:  # never stop kohya over the bench's profiler
        print(f"dermkohya step_profile: not started ({type(exc).__name__}: {exc})", file=sys.stderr)


def _chain() -> None:
    """The next sitecustomize on sys.path (the image's own, if any) still runs."""
    others = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


_start()
_chain()
