"""Speed benchmarks of plip-jax against `transformers` (not installed with the package: they import torch).
Entry point: `python -m benchmarks.bench --help`; results in benchmarks/RESULTS.md."""
