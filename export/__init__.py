"""Checkpoint -> ONNX model package (not built yet)."""
