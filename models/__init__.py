"""Networks, data, training, pruning, FLOPs and the model registry. Knows nothing of the cascade."""
