"""The generated API stubs (from protos/ by `make stubs`), importable as `server.proto.pb`.

protoc writes `snaprag/v1/*_pb2.py` with absolute imports of `snaprag.v1`, so their output folder has
to be an import root; it is kept out of the source tree's packages (server/_gen, never committed).
"""

from __future__ import annotations

import sys
from pathlib import Path

_GEN = Path(__file__).resolve().parent / "_gen"
if not (_GEN / "snaprag" / "v1" / "snaprag_pb2.py").exists():
    raise ImportError(f"gRPC stubs not generated in {_GEN}: run `make stubs` (or `make run` / `make test`)")
if str(_GEN) not in sys.path:
    sys.path.insert(0, str(_GEN))

if not (_GEN / "snaprag" / "v1" / "admin_pb2.py").exists():
    raise ImportError(f"gRPC stubs for admin.proto missing in {_GEN}: run `make stubs`")

from snaprag.v1 import admin_pb2 as admin_pb  # noqa: E402
from snaprag.v1 import admin_pb2_grpc as admin_pb_grpc  # noqa: E402
from snaprag.v1 import snaprag_pb2 as pb  # noqa: E402
from snaprag.v1 import snaprag_pb2_grpc as pb_grpc  # noqa: E402

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Assistant"].full_name
ADMIN_SERVICE_NAME = admin_pb.DESCRIPTOR.services_by_name["IndexAdmin"].full_name

__all__ = ["ADMIN_SERVICE_NAME", "SERVICE_NAME", "admin_pb", "admin_pb_grpc", "pb", "pb_grpc"]
