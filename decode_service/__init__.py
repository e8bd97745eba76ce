"""Decode gRPC service (services issue)."""
