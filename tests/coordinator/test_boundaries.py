"""The coordinator's wire boundary: only ``coordinator/gateway`` knows gRPC and protobuf.

Everything else (dispatch, billing, verification, the HTTP layer, the service) speaks the domain
values of ``coordinator/jobs.py`` and the ``Worker`` protocol of ``coordinator/worker.py``, so a
miner reached some other way (another replica, a test double) fits without touching them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import coordinator

_PACKAGE = Path(coordinator.__file__).parent
_WIRE_MODULES = ("grpc", "proto.miner_pb2", "proto.miner_pb2_grpc", "google.protobuf")
# TLS material is handed to grpc as credentials where the certificates are loaded.
_ALLOWED_OUTSIDE_GATEWAY = {"tls.py": {"grpc"}}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_wire(name: str) -> bool:
    return any(name == wire or name.startswith(f"{wire}.") for wire in _WIRE_MODULES)


def test_only_the_gateway_imports_grpc_or_protobuf() -> None:
    offenders = {}
    for path in sorted(_PACKAGE.rglob("*.py")):
        relative = path.relative_to(_PACKAGE)
        if relative.parts[0] == "gateway":
            continue
        allowed = _ALLOWED_OUTSIDE_GATEWAY.get(str(relative), set())
        wire = {name for name in _imports(path) if _is_wire(name) and name not in allowed}
        if wire:
            offenders[str(relative)] = sorted(wire)
    assert offenders == {}


def test_the_gateway_is_where_the_stubs_are_used() -> None:
    """The check above would pass vacuously if the scan found nothing: the gateway must show up."""
    gateway = [_imports(path) for path in (_PACKAGE / "gateway").glob("*.py")]
    assert any("proto.miner_pb2" in names for names in gateway)
    assert any("proto.miner_pb2_grpc" in names for names in gateway)
