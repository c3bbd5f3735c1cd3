"""Speed benchmarks; run from the repository root as ``python -m benchmarks.bench`` (see README, Benchmarks)."""
