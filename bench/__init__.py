"""Benchmarks and measurement scripts (installed as samba_edge.bench; run them with python bench/NAME.py)."""
