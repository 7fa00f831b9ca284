"""thrifty.engine."""
