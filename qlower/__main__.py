"""``python -m qlower``: the command line, as the ``qlower`` script runs it."""

from .cli import run

run()
