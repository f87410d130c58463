"""The gRPC edge: request validation, servicers, conversion between protobuf and state values."""
