"""The ``unipack`` command line (click): a thin front end over the Python API."""

from unipack.cli.commands import cli, main

__all__ = ["cli", "main"]
