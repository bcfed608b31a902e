"""Benchmarks: speed, memory and accuracy targets, measured side by side (RESULTS.md)."""
