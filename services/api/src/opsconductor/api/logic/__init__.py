"""Api service logic: plain async Python, no gRPC, no pb2."""
