"""Benchmarks that write JSON results under bench/results/ (never timed assertions in tests)."""
