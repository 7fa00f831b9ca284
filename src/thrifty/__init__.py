"""thrifty: LLM serving at the lowest cost per token."""
__version__ = "0.1.0"
