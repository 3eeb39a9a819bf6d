"""Causal language models: their sources (tiny, local, Hub, the offline wheel), loading and device."""
