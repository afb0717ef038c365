"""Service logic of the approvals service: plain async Python, no gRPC, no protobuf."""
