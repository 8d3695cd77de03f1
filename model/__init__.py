"""Model loading, the tiny built-in VLM, heads and log-prob utilities."""
