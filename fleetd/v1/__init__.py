"""Generated protobuf and gRPC stubs of package fleetd.v1 (`make proto`; do not edit)."""
