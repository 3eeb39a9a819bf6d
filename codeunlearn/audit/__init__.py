"""Audit records of unlearning requests: built once, judged against thresholds, re-verified later."""
