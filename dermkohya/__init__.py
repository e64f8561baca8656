"""dermkohya: a thin, strict layer over kohya-ss sd-scripts for dermatology LoRA training."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dermkohya")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
