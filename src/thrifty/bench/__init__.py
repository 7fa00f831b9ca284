"""thrifty.bench."""
