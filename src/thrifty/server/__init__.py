"""thrifty.server."""
