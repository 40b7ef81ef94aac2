"""Throughput and memory benchmarks; they print ratios and are never timed tests."""
