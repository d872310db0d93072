"""Writers for other checkpoint formats (compressed-tensors, for vLLM)."""
