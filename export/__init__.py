"""Checkpoint -> ONNX model package: custom gather ops, the graph, parity, the package format."""
