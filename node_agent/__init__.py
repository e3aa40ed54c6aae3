"""The node agent: registers this node's capacity with the head, heartbeats, and runs replicas on command."""

from node_agent.cli import main

__all__ = ["main"]
