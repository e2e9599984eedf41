"""The scoring service (not built yet)."""
