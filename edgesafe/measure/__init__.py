"""Measuring models, for any stage: latency of a UNet step, images at fixed seeds, Frechet distances."""
