"""sae_training."""
