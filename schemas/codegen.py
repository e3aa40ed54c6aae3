"""Generates the Python gRPC stubs into schemas/_gen (ignored): `python -m schemas.codegen`."""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).parent
OUT = HERE / "_gen"


def main() -> int:
    proto = HERE / "tokenbus.proto"
    stamp = OUT / "tokenbus_pb2.py"
    if stamp.exists() and stamp.stat().st_mtime >= proto.stat().st_mtime:
        return 0
    OUT.mkdir(exist_ok=True)
    (OUT / "__init__.py").write_text("")
    rc = protoc.main(
        [
            "protoc",
            f"--proto_path={HERE}",
            f"--python_out={OUT}",
            f"--pyi_out={OUT}",
            f"--grpc_python_out={OUT}",
            str(proto),
        ]
    )
    if rc != 0:
        return rc
    # grpcio-tools writes `import tokenbus_pb2`; make it a package-relative import
    grpc_file = OUT / "tokenbus_pb2_grpc.py"
    grpc_file.write_text(grpc_file.read_text().replace("import tokenbus_pb2 as", "from . import tokenbus_pb2 as"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
