"""Trace-driven simulation of the KV cache: the engine's block pool replayed on request traces."""
