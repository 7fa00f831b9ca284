"""thrifty.gateway."""
