"""Benchmarks behind ``fairbus bench``: commands that print numbers, never timed tests."""
