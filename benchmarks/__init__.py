"""Benchmarks of the course: attention on a GPU (attention.py) and grading throughput (grading_throughput.py)."""
