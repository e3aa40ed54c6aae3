"""The model worker: the engine side of a replica, joined to its C++ replica by shared-memory rings."""
