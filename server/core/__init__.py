"""The pure serving core: artifacts, the engine (the only onnxruntime caller), sampling, generation."""
