"""Benchmarks for bff: ``make bench`` measures and prints; it asserts nothing about time."""
