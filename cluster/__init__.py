"""Thin Ray orchestration around `engine`: actor pools, probe fan-out, vLLM actor, Ray Train, CLI."""
