"""The Open Inference Protocol v2 (KServe/Triton) gRPC service: its .proto, compiled modules."""
