"""Numeric hot paths: pure functions over explicit arrays. No I/O, no gRPC, no config objects."""
