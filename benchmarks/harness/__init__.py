"""Benchmark harness: plip-jax workloads vs `transformers` (PyTorch eager) on random weights at real
model shapes, with roofline floors, compile times and peak memory. Entry point: `benchmarks/bench.py`;
library: `runner.run(Options(...))`."""
