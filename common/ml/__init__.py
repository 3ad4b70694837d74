"""Model code for genq: families, data, checkpoints, the training loop and generation."""
