"""Benchmarks that run from one command against the running stack and print side-by-side comparisons."""
