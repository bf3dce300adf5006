"""Offline training and ONNX export; the only package of nextchar that imports torch."""
