"""`python -m einstruct`: see einstruct.cli."""

from .cli import main, run_command

run_command(main)
