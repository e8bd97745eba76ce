"""Moving KV blocks between processes (services issue)."""
