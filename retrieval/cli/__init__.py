"""The `retrieval` command line (`retrieval.cli.app`) and the argument helpers it shares
with `classify` and the benchmarks (`retrieval.cli.args`, `retrieval.cli.util`)."""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `retrieval` console script."""
    from .app import main as run

    return run(argv)
