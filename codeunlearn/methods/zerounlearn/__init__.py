"""ZeroUnlearn: re-map forget prompts by editing MLP down_proj (see ``method``)."""
