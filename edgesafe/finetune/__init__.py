"""Fine-tuning objectives and the training loop."""
