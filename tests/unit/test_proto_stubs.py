"""The committed stubs in fleetd/v1/ are exactly what `make proto` generates from proto/."""

from __future__ import annotations

from pathlib import Path

from fleetd import protogen


def test_stubs_match_proto_sources(tmp_path: Path) -> None:
    generated = protogen.generate(tmp_path)
    committed_dir = protogen.REPO / protogen.PACKAGE_DIR
    committed = sorted(p.relative_to(protogen.REPO) for p in committed_dir.glob("*_pb2*"))
    assert committed == generated, "stub files differ from the .proto set: run `make proto`"
    stale = [
        str(rel)
        for rel in generated
        if (tmp_path / rel).read_bytes() != (protogen.REPO / rel).read_bytes()
    ]
    assert stale == [], f"stubs drifted from proto/: run `make proto` ({stale})"


def test_every_service_has_stubs() -> None:
    from fleetd.v1 import fleet_pb2_grpc, nodepools_pb2_grpc, placement_pb2_grpc

    assert hasattr(placement_pb2_grpc, "PlacementServicer")
    assert hasattr(nodepools_pb2_grpc, "NodePoolsServicer")
    assert hasattr(fleet_pb2_grpc, "FleetServicer")
