"""Backends: turn the final IR into an artifact (`ort`: an ONNX Runtime model directory)."""
