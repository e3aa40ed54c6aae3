"""Contracts shared by every tokenbus process: the bus messages (MessagePack) and the gRPC service."""
