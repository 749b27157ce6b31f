"""Entry point of the agent artifact: the `gpufleet` command (agent subcommands; deploy/agent/build_artifact.py)."""

from gpufleet.cli import main

main()
