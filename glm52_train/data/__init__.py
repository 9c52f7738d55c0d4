"""Data: tokenizers, preparation of Megatron-Core indexed datasets, and training data loaders."""
