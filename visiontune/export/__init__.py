"""Exporting a run's model for other runtimes (ONNX, optionally int8)."""
