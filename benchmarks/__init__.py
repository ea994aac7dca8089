"""Speed and accuracy benchmarks; run each as ``python -m benchmarks.<name>``."""
