"""Prefill gRPC service (services issue)."""
