"""Probe-KD engine: the pure library (no ray, no vllm). See README.md."""
