"""Training: the run configuration, data with prompt masking, and the Trainer-based run."""
