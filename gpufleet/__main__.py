"""`python -m gpufleet` runs the CLI (used to start child processes with the same interpreter)."""

from gpufleet.cli import main

main()
