"""Weights -> torch modules: the model zoo, file formats, tokenizers and architectures."""
