"""What runs in an engine's pod beside the engine: downloader, runtime sidecar, PD proxy."""
