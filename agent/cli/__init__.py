"""The ``agent`` command line."""

from agent.cli.commands import main

__all__ = ["main"]
