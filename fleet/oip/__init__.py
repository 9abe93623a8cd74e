"""The Open Inference Protocol v2 (KServe/Triton) gRPC service: the .proto and its compiled modules."""
