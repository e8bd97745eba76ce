"""Gateway: OpenAI REST shim, public gRPC, routing, Redis state (gateway issue)."""
