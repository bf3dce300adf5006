"""The online side: onnxruntime + numpy + grpc, never torch."""
