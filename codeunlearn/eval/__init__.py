"""Evaluation: the sets a model is scored on, its TOFU and MIA numbers, MUSE-News, the sweep and the
sequential studies."""
