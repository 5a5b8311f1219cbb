"""Benchmarks: `kvserve bench latency | throughput` (offline.py), prompts and statistics
(workloads.py), the transformers baseline (hf_baseline.py), tables and plots (plots.py)."""
