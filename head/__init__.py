"""The head controller: desired state, placement, replica lifecycle, routing snapshots, the admin API."""

from head.cli import main

__all__ = ["main"]
