"""Measuring models: latency, quality and safety."""
