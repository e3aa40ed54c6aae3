"""The generated gRPC modules, imported from schemas/_gen (run `python -m schemas.codegen` first)."""

from schemas._gen import tokenbus_pb2 as pb
from schemas._gen import tokenbus_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
