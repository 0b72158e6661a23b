"""``python -m edgesafe``: the command-line interface."""

from .cli import run

run()
