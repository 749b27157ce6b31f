"""`gpufleet schema`: export the wire contract as JSON Schema."""

from __future__ import annotations

import json
from pathlib import Path

import click

from gpufleet.wire import json_schema


@click.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here instead of stdout.")
def schema(out: Path | None) -> None:
    """Print the JSON Schema of the Kafka message (NodeReport)."""
    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if out:
        out.write_text(text)
    else:
        click.echo(text, nl=False)
