"""Benchmarks: latency, recall and SLO harnesses. Run as `python -m bench.<name>`; results in bench/RESULTS.md."""
