"""Load tests and the serving benchmark driver (not built yet)."""
