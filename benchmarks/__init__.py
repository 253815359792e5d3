"""Benchmarks of medssl, each run from the repository root as a module: ``python -m benchmarks.<name> ...``."""
