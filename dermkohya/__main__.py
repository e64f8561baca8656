"""`python -m dermkohya …`, e.g. under a launcher: `torchrun --nproc_per_node 2 -m dermkohya generate plan.toml`."""

from dermkohya.cli import main

main(prog_name="dermkohya")
