"""Benchmarks: the ``engine bench`` load generator, metrics, baselines and plots."""
