"""Load-testing harness (loadtest issue)."""
