"""What runs inside an engine's pod beside the engine.

- :mod:`runtime.downloader` (``matrixinfer-downloader``): the init container that puts a Model's
  weights (or a LoRA adapter) from ``hf://``, ``s3://``, ``pvc://`` or ``file://`` into the cache.
- :mod:`runtime.sidecar` (``matrixinfer-runtime``): the sidecar next to the engine: readiness that
  reflects the engine's, LoRA adapters loaded through the engine's own API, and the engine's metrics
  under one set of ``matrixinfer_engine_*`` names.
- :mod:`runtime.pd_proxy` (``matrixinfer-pd-proxy``): the prefill/decode proxy on decode pods.
"""
